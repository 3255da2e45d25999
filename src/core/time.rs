//! Times as people read them: Unix nanoseconds (marker and generation times) as UTC text.

/// `YYYY-MM-DD hh:mm:ss` (UTC) of Unix nanoseconds.
pub fn utc(ns: u64) -> String {
    let (date, (hour, minute, second)) = civil(ns);
    format!("{date} {hour:02}:{minute:02}:{second:02}")
}

/// RFC 3339 (`YYYY-MM-DDThh:mm:ss.nnnnnnnnnZ`) of Unix nanoseconds, for JSON.
pub fn rfc3339(ns: u64) -> String {
    let (date, (hour, minute, second)) = civil(ns);
    format!("{date}T{hour:02}:{minute:02}:{second:02}.{:09}Z", ns % 1_000_000_000)
}

fn civil(ns: u64) -> (String, (u64, u64, u64)) {
    let seconds = ns / 1_000_000_000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), (rest / 3600, rest % 3600 / 60, rest % 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(utc(951_827_696_000_000_000), "2000-02-29 12:34:56");
        assert_eq!(rfc3339(1_796_022_289_123_456_789), "2026-11-30T07:04:49.123456789Z");
    }
}

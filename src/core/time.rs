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

/// Unix nanoseconds of `text`: all digits (Unix nanoseconds), or RFC 3339
/// (`YYYY-MM-DDThh:mm:ss[.fraction](Z|±hh:mm)`, `T` or a space between date and time).
pub fn parse(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text} is beyond the Unix nanoseconds a u64 holds"));
    }
    let bad = || format!("{text:?} is neither Unix nanoseconds nor RFC 3339 (like 2026-11-30T13:05:07.5Z)");
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return Err(bad());
    }
    let number = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = text.get(range).ok_or_else(bad)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let mut rest = &text[19..];
    let mut nanos = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return Err(bad());
        }
        nanos = fraction[..digits].parse::<i64>().map_err(|_| bad())? * 10i64.pow(9 - digits as u32);
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let (h, m) = (number(text.len() - 5..text.len() - 3)?, number(text.len() - 2..text.len())?);
            sign * (h * 3600 + m * 60)
        }
        _ => return Err(bad()),
    };
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm, the inverse of `civil`).
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    u64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .and_then(|ns| ns.checked_add(nanos as u64))
        .ok_or_else(|| format!("{text} is before 1970 or too far ahead"))
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

    #[test]
    fn parses_what_it_prints_and_unix_nanoseconds() {
        for ns in [0, 951_827_696_000_000_000, 1_796_022_289_123_456_789] {
            assert_eq!(parse(&rfc3339(ns)), Ok(ns));
        }
        assert_eq!(parse("1796022289123456789"), Ok(1_796_022_289_123_456_789));
        assert_eq!(parse("2026-11-30T08:04:49.5+01:00"), Ok(1_796_022_289_500_000_000));
        assert_eq!(parse("2026-11-30 07:04:49Z"), Ok(1_796_022_289_000_000_000));
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-30T07:04:49", "1969-12-31T23:59:59Z"] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }
}

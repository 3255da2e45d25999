/* Input of bindgen for the `spdk` feature (see build.rs). Public SPDK headers only: no
 * `*_internal.h`, no module-private headers. */
#include <spdk/stdinc.h>
#include <spdk/version.h>
#include <spdk/env.h>
#include <spdk/log.h>
#include <spdk/string.h>
#include <spdk/util.h>
#include <spdk/json.h>
#include <spdk/jsonrpc.h>
#include <spdk/rpc.h>
#include <spdk/thread.h>
#include <spdk/dma.h>
#include <spdk/bdev.h>
#include <spdk/bdev_module.h>

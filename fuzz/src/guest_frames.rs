//! Target `guest_frames`: the guest channel's frame decoder, both directions.
//!
//! The agent decodes [`GuestMsg`] frames from a byte stream a guest controls entirely;
//! herd-guest decodes [`HostMsg`] frames from the host. The decoder promises that it never
//! buffers more than one frame, that an error poisons it for good, and (implicitly, as a
//! stream decoder) that how the stream is cut into reads does not change what it decodes.
//! This target checks all three on arbitrary bytes, and checks that every message, as
//! built by the sender, decodes to itself.
//!
//! Input layout, so that seeds are easy to write by hand:
//! - byte 0, flags: bit 0 decodes `HostMsg` (else `GuestMsg`); bit 1 is round-trip mode.
//! - decode mode: byte 1 is the number of chunk sizes `n` (mod 8), then `n` chunk sizes
//!   (a size of 0 feeds an empty read, then one byte); then a repeat count (mod 16, plus
//!   one); the rest of the input is the stream, fed that many times over.
//! - round-trip mode: the same chunking bytes, then the rest of the input builds up to 8
//!   messages with [`arbitrary`].

use herd_proto::burst::{BurstAnswer, BurstAsk, BurstLease};
use arbitrary::Unstructured;
use herd_proto::guest::{
    encode_frame, FrameDecoder, GuestFrameError, GuestMsg, HostMsg, MAX_GUEST_FRAME,
};
use herd_proto::policy::PolicyAction;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use uuid::Uuid;

/// Flag bit: decode host-to-guest messages.
pub const FLAG_HOST: u8 = 1;
/// Flag bit: build messages, encode them and decode them back.
pub const FLAG_ROUND_TRIP: u8 = 2;

pub fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (sizes, rest) = chunk_sizes(rest);
    if flags & FLAG_ROUND_TRIP != 0 {
        if flags & FLAG_HOST != 0 {
            round_trip(&sizes, rest, arb_host_msg);
        } else {
            round_trip(&sizes, rest, arb_guest_msg);
        }
        return;
    }
    let Some((&repeat, stream)) = rest.split_first() else {
        return;
    };
    let stream = stream.repeat(usize::from(repeat % 16) + 1);
    if flags & FLAG_HOST != 0 {
        check_stream::<HostMsg>(&stream, &sizes);
    } else {
        check_stream::<GuestMsg>(&stream, &sizes);
    }
}

/// Splits off the chunk sizes: a count, then that many sizes.
fn chunk_sizes(data: &[u8]) -> (Vec<u8>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(n % 8).min(rest.len());
    (rest[..n].to_vec(), &rest[n..])
}

/// What feeding a stream produced: the messages, the first error, and what stayed
/// buffered.
struct Fed<T> {
    msgs: Vec<T>,
    error: Option<GuestFrameError>,
    buffered: usize,
}

/// Feeds `stream` cut into reads of `sizes` (cycled), or whole when there are none,
/// checking the bound on buffering after every read and the poisoning after an error.
fn feed<T: DeserializeOwned>(stream: &[u8], sizes: &[u8]) -> Fed<T> {
    let mut decoder = FrameDecoder::new();
    let mut fed = Fed {
        msgs: Vec::new(),
        error: None,
        buffered: 0,
    };
    let mut rest = stream;
    let mut idx = 0;
    loop {
        let size = match sizes.get(idx % sizes.len().max(1)) {
            None => rest.len(),
            Some(&size) => usize::from(size),
        };
        idx += 1;
        let (read, after) = rest.split_at(size.min(rest.len()));
        let result = decoder.feed::<T>(read);
        assert!(
            decoder.buffered() <= MAX_GUEST_FRAME + 4,
            "decoder holds {} bytes",
            decoder.buffered()
        );
        match result {
            Ok(msgs) => {
                if read.is_empty() {
                    assert!(msgs.is_empty(), "an empty read completed a message");
                }
                fed.msgs.extend(msgs);
            }
            Err(error) => {
                assert!(
                    matches!(decoder.feed::<T>(b"\0"), Err(GuestFrameError::Poisoned)),
                    "decoder not poisoned after {error:?}"
                );
                fed.error = Some(error);
                break;
            }
        }
        rest = after;
        if size == 0 && !rest.is_empty() {
            // An empty read must not stall the stream: take one byte next.
            let (byte, after) = rest.split_at(1);
            let msgs = decoder.feed::<T>(byte);
            match msgs {
                Ok(msgs) => fed.msgs.extend(msgs),
                Err(error) => {
                    fed.error = Some(error);
                    break;
                }
            }
            rest = after;
        }
        if rest.is_empty() {
            break;
        }
    }
    fed.buffered = decoder.buffered();
    fed
}

/// How the stream is cut into reads must not change what it decodes to.
fn check_stream<T: DeserializeOwned + PartialEq + Debug>(stream: &[u8], sizes: &[u8]) {
    let whole = feed::<T>(stream, &[]);
    if sizes.is_empty() {
        return;
    }
    let cut = feed::<T>(stream, sizes);
    match &whole.error {
        None => {
            assert_eq!(cut.error, None, "cutting the stream made it fail");
            assert_eq!(
                cut.msgs, whole.msgs,
                "cutting the stream changed the messages"
            );
            assert_eq!(cut.buffered, whole.buffered);
        }
        Some(error) => {
            assert_eq!(
                cut.error.as_ref(),
                Some(error),
                "cutting the stream changed the error"
            );
        }
    }
}

/// Every message a sender builds decodes to itself, however the stream is cut.
fn round_trip<T: DeserializeOwned + serde::Serialize + PartialEq + Debug>(
    sizes: &[u8],
    data: &[u8],
    arb: fn(&mut Unstructured) -> arbitrary::Result<T>,
) {
    let mut u = Unstructured::new(data);
    let mut msgs = Vec::new();
    let mut stream = Vec::new();
    while msgs.len() < 8 && !u.is_empty() {
        let Ok(msg) = arb(&mut u) else {
            break;
        };
        match encode_frame(&msg) {
            Ok(frame) => stream.extend(frame),
            // A message too large for one frame cannot be sent; the sender must split it.
            Err(GuestFrameError::TooLarge(_)) => continue,
            Err(error) => panic!("cannot encode {msg:?}: {error}"),
        }
        msgs.push(msg);
    }
    for sizes in [&[][..], sizes] {
        let fed = feed::<T>(&stream, sizes);
        assert_eq!(fed.error, None, "a well-formed stream failed");
        assert_eq!(fed.msgs, msgs);
        assert_eq!(fed.buffered, 0);
    }
}

/// Fails to compile when a variant is added, so that [`arb_guest_msg`] learns of it.
fn guest_variants(msg: &GuestMsg) -> u8 {
    match msg {
        GuestMsg::Hello { .. } => 0,
        GuestMsg::Status { .. } => 1,
        GuestMsg::Usage { .. } => 2,
        GuestMsg::WorkloadExit { .. } => 3,
        GuestMsg::Error { .. } => 4,
        GuestMsg::PolicyWarning { .. } => 5,
        GuestMsg::PolicyAction { .. } => 6,
        GuestMsg::PolicyProgress { .. } => 7,
        GuestMsg::Burst { .. } => 8,
    }
}

pub fn arb_guest_msg(u: &mut Unstructured) -> arbitrary::Result<GuestMsg> {
    let msg = match u.int_in_range(0..=8u8)? {
        0 => GuestMsg::Hello {
            vm_id: Uuid::from_u128(u.arbitrary()?),
            management_token: u.arbitrary()?,
            guest_version: u.arbitrary()?,
        },
        1 => GuestMsg::Status {
            uptime_ms: u.arbitrary()?,
            workload_running: u.arbitrary()?,
            guest_rss_kib: u.arbitrary()?,
        },
        2 => GuestMsg::Usage {
            cpu_ms: u.arbitrary()?,
            mem_kib: u.arbitrary()?,
            net_rx: u.arbitrary()?,
            net_tx: u.arbitrary()?,
        },
        3 => GuestMsg::WorkloadExit {
            code: u.arbitrary()?,
        },
        4 => GuestMsg::Error {
            message: u.arbitrary()?,
        },
        5 => GuestMsg::PolicyWarning {
            rule: u.arbitrary()?,
            message: u.arbitrary()?,
        },
        6 => GuestMsg::PolicyAction {
            rule: u.arbitrary()?,
            action: *u.choose(&PolicyAction::ALL)?,
            reason: u.arbitrary()?,
        },
        7 => GuestMsg::PolicyProgress {
            items: u.arbitrary()?,
        },
        _ => GuestMsg::Burst {
            ask: BurstAsk {
                cpus: u.arbitrary()?,
                memory_mib: u.arbitrary()?,
                seconds: u.arbitrary()?,
            },
        },
    };
    debug_assert!(guest_variants(&msg) <= 8);
    Ok(msg)
}

/// Fails to compile when a variant is added, so that [`arb_host_msg`] learns of it.
fn host_variants(msg: &HostMsg) -> u8 {
    match msg {
        HostMsg::Hello => 0,
        HostMsg::Ack => 1,
        HostMsg::PowerOff => 2,
        HostMsg::Time { .. } => 3,
        HostMsg::Burst { .. } => 4,
    }
}

pub fn arb_host_msg(u: &mut Unstructured) -> arbitrary::Result<HostMsg> {
    let msg = match u.int_in_range(0..=4u8)? {
        0 => HostMsg::Hello,
        1 => HostMsg::Ack,
        2 => HostMsg::PowerOff,
        3 => HostMsg::Time {
            unix_ms: u.arbitrary()?,
        },
        _ => HostMsg::Burst {
            answer: if u.arbitrary()? {
                BurstAnswer::Granted(BurstLease {
                    cpus: u.arbitrary()?,
                    memory_mib: u.arbitrary()?,
                    granted_ms: u.arbitrary()?,
                    expires_ms: u.arbitrary()?,
                })
            } else {
                BurstAnswer::Denied {
                    reason: u.arbitrary()?,
                }
            },
        },
    };
    debug_assert!(host_variants(&msg) <= 4);
    Ok(msg)
}

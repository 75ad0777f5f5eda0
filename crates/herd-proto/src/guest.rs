//! The guest channel: messages between herd-guest (inside a VM) and the agent.
//!
//! The channel is a virtio-serial port, a plain byte stream with no message boundaries
//! and, after a suspend/restore or an agent restart, a fresh connection that may start
//! anywhere. Frames are therefore self-delimiting: a 4-byte big-endian length, then a
//! postcard body (the same encoding as the agent wire protocol, so one set of strictness
//! rules applies; a trailing byte in a body is an error).
//!
//! Everything a guest sends is untrusted input: the guest runs code herd does not control. The decoder is incremental,
//! refuses a frame longer than [`MAX_GUEST_FRAME`] as soon as it reads the length (before
//! buffering any of it), and never holds more than one frame, so a misbehaving guest
//! cannot grow the agent's memory. After an error the decoder stays failed: the stream is
//! out of step and the caller must drop the connection and open a new one.
//!
//! Identity never comes from a message: the agent knows which VM a channel belongs to
//! from the socket it opened; `Hello` only carries a token to check against it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest frame body either side accepts.
pub const MAX_GUEST_FRAME: usize = 64 * 1024;

/// Version of this protocol; carried in `Hello` for diagnostics.
pub const GUEST_PROTOCOL_VERSION: u32 = 1;

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum GuestMsg {
    /// Sent when herd-guest starts and whenever the host greets it on a new connection.
    Hello {
        vm_id: Uuid,
        management_token: String,
        guest_version: String,
    },
    /// What the guest is doing, sent after each `Hello`.
    Status {
        uptime_ms: u64,
        workload_running: bool,
        /// Resident memory of herd-guest itself, to keep the module honest about its size.
        guest_rss_kib: u64,
    },
    /// Counters of the whole guest since boot.
    Usage {
        cpu_ms: u64,
        mem_kib: u64,
        net_rx: u64,
        net_tx: u64,
    },
    /// The workload ended; the guest powers off next unless told to keep running.
    WorkloadExit { code: i32 },
    /// Something went wrong inside the guest that the host should know about.
    Error { message: String },
    /// A policy rule is close to firing (`rule` is `herd_policy::Rule::as_str`).
    PolicyWarning { rule: String, message: String },
    /// A policy rule fired and the guest is carrying out `action` itself: `Notify` is
    /// only this report; `Stop` and `Terminate` power the VM off right after it;
    /// `Suspend` asks the host to suspend the VM (the guest freezes its workload if no
    /// host is connected within 5 s).
    PolicyAction {
        rule: String,
        action: crate::policy::PolicyAction,
        reason: String,
    },
    /// How far each rule is from firing, about every 5 s: (rule, text, fraction in
    /// thousandths, seconds left when the rule is time-based).
    PolicyProgress {
        items: Vec<(String, String, u32, Option<u64>)>,
    },
    /// The workload asks for more CPU or memory for a while; the host answers with
    /// [`HostMsg::Burst`].
    Burst { ask: crate::burst::BurstAsk },
}

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HostMsg {
    /// The host opened a new connection; the guest answers with `Hello` and `Status`.
    Hello,
    /// Acknowledges a guest message (reserved for later flow control).
    Ack,
    /// Ends the workload and powers the VM off.
    PowerOff,
    /// The host's wall clock, sent in answer to each guest `Hello`: a guest restored from a
    /// suspend image (or booted from a whole-second RTC) sets its clock from it, so time
    /// rules count the time it spent suspended.
    Time { unix_ms: u64 },
    /// The answer to the guest's latest [`GuestMsg::Burst`].
    Burst { answer: crate::burst::BurstAnswer },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestFrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_GUEST_FRAME} bytes")]
    TooLarge(usize),
    #[error("frame body does not decode: {0}")]
    Malformed(String),
    #[error("frame body has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("the decoder failed earlier; the connection must be reopened")]
    Poisoned,
}

/// Encodes one message as a length-prefixed frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, GuestFrameError> {
    let body = postcard::to_stdvec(msg).map_err(|e| GuestFrameError::Malformed(e.to_string()))?;
    if body.len() > MAX_GUEST_FRAME {
        return Err(GuestFrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes one frame body, refusing trailing bytes.
pub fn decode_body<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, GuestFrameError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| GuestFrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(GuestFrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Incremental frame decoder for one connection.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    header: [u8; 4],
    header_len: usize,
    /// The body being read, once its length is known and accepted.
    body: Option<(usize, Vec<u8>)>,
    poisoned: bool,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Bytes currently held; never more than [`MAX_GUEST_FRAME`] + 4.
    pub fn buffered(&self) -> usize {
        self.header_len + self.body.as_ref().map(|(_, b)| b.len()).unwrap_or(0)
    }

    /// Feeds bytes from the stream and returns every message they complete.
    ///
    /// On error the messages completed before it are lost with it; the decoder is then
    /// poisoned, because the stream can no longer be trusted to be in step.
    pub fn feed<T: for<'de> Deserialize<'de>>(
        &mut self,
        mut input: &[u8],
    ) -> Result<Vec<T>, GuestFrameError> {
        if self.poisoned {
            return Err(GuestFrameError::Poisoned);
        }
        let mut out = Vec::new();
        while !input.is_empty() {
            match self.step(&mut input) {
                Ok(Some(msg)) => out.push(msg),
                Ok(None) => {}
                Err(e) => {
                    self.poisoned = true;
                    self.body = None;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn step<T: for<'de> Deserialize<'de>>(
        &mut self,
        input: &mut &[u8],
    ) -> Result<Option<T>, GuestFrameError> {
        let Some((want, body)) = self.body.as_mut() else {
            let take = (4 - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            *input = &input[take..];
            if self.header_len == 4 {
                self.header_len = 0;
                let len = u32::from_be_bytes(self.header) as usize;
                if len > MAX_GUEST_FRAME {
                    return Err(GuestFrameError::TooLarge(len));
                }
                if len == 0 {
                    // postcard never encodes any of our messages in zero bytes.
                    return decode_body(&[]).map(Some);
                }
                self.body = Some((len, Vec::with_capacity(len.min(4096))));
            }
            return Ok(None);
        };
        let take = (*want - body.len()).min(input.len());
        body.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if body.len() < *want {
            return Ok(None);
        }
        let body = self.body.take().map(|(_, b)| b).unwrap_or_default();
        decode_body(&body).map(Some)
    }
}

impl GuestMsg {
    /// What of this message the server needs: everything but the guest's credential and
    /// its usage counters (those travel with the host's usage batches).
    pub fn to_report(&self) -> Option<crate::wire::GuestReport> {
        use crate::wire::GuestReport;
        match self {
            GuestMsg::Hello { guest_version, .. } => Some(GuestReport::Hello {
                guest_version: guest_version.clone(),
            }),
            GuestMsg::Status {
                uptime_ms,
                workload_running,
                guest_rss_kib,
            } => Some(GuestReport::Status {
                uptime_ms: *uptime_ms,
                workload_running: *workload_running,
                guest_rss_kib: *guest_rss_kib,
            }),
            GuestMsg::Usage { .. } => None,
            GuestMsg::WorkloadExit { code } => Some(GuestReport::WorkloadExit { code: *code }),
            GuestMsg::Error { message } => Some(GuestReport::Error {
                message: message.clone(),
            }),
            GuestMsg::PolicyWarning { rule, message } => Some(GuestReport::PolicyWarning {
                rule: rule.clone(),
                message: message.clone(),
            }),
            GuestMsg::PolicyAction {
                rule,
                action,
                reason,
            } => Some(GuestReport::PolicyAction {
                rule: rule.clone(),
                action: *action,
                reason: reason.clone(),
            }),
            GuestMsg::PolicyProgress { items } => Some(GuestReport::PolicyProgress {
                items: items.clone(),
            }),
            // The host answers these itself; the server hears the leases they give.
            GuestMsg::Burst { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> GuestMsg {
        GuestMsg::Hello {
            vm_id: Uuid::from_u128(42),
            management_token: "tok".into(),
            guest_version: "0.1.0".into(),
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = vec![
            hello(),
            GuestMsg::Usage {
                cpu_ms: 1,
                mem_kib: 2,
                net_rx: 3,
                net_tx: u64::MAX,
            },
            GuestMsg::WorkloadExit { code: -3 },
            GuestMsg::Error {
                message: "x".repeat(1000),
            },
            GuestMsg::PolicyWarning {
                rule: "lifespan".into(),
                message: "ends in 3 s".into(),
            },
            GuestMsg::PolicyAction {
                rule: "budget".into(),
                action: crate::policy::PolicyAction::Stop,
                reason: "cpu".into(),
            },
            GuestMsg::PolicyProgress {
                items: vec![("idle".into(), "idle 1.0 of 5 s".into(), 200, Some(4))],
            },
            GuestMsg::Burst {
                ask: crate::burst::BurstAsk {
                    cpus: 1,
                    memory_mib: 512,
                    seconds: 600,
                },
            },
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode_frame(m).expect("encode"));
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            got.extend(dec.feed::<GuestMsg>(std::slice::from_ref(b)).expect("feed"));
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.buffered(), 0);
        let mut dec = FrameDecoder::new();
        assert_eq!(dec.feed::<GuestMsg>(&stream).expect("feed"), msgs);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        let len = (MAX_GUEST_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            dec.feed::<GuestMsg>(&len),
            Err(GuestFrameError::TooLarge(MAX_GUEST_FRAME + 1))
        );
        assert_eq!(dec.buffered(), 0);
        assert_eq!(dec.feed::<GuestMsg>(&[0]), Err(GuestFrameError::Poisoned));
    }

    #[test]
    fn trailing_bytes_and_unknown_variants_are_refused() {
        let mut body = postcard::to_stdvec(&GuestMsg::WorkloadExit { code: 1 }).expect("enc");
        body.push(0);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend(&body);
        assert_eq!(
            FrameDecoder::new().feed::<GuestMsg>(&frame),
            Err(GuestFrameError::TrailingBytes(1))
        );
        let frame = [0, 0, 0, 1, 99];
        assert!(matches!(
            FrameDecoder::new().feed::<GuestMsg>(&frame),
            Err(GuestFrameError::Malformed(_))
        ));
        let host = encode_frame(&HostMsg::PowerOff).expect("enc");
        assert_eq!(
            FrameDecoder::new().feed::<HostMsg>(&host).expect("dec"),
            vec![HostMsg::PowerOff]
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics_or_overbuffers(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let mut dec = FrameDecoder::new();
            for c in &chunks {
                let _ = dec.feed::<GuestMsg>(c);
                prop_assert!(dec.buffered() <= MAX_GUEST_FRAME + 4);
            }
        }

        #[test]
        fn any_split_decodes_the_same(cut in 0usize..200, code in any::<i32>(), s in ".{0,50}") {
            let msgs = vec![GuestMsg::Error { message: s }, GuestMsg::WorkloadExit { code }];
            let mut stream = Vec::new();
            for m in &msgs { stream.extend(encode_frame(m).expect("encode")); }
            let cut = cut.min(stream.len());
            let mut dec = FrameDecoder::new();
            let mut got = dec.feed::<GuestMsg>(&stream[..cut]).expect("a");
            got.extend(dec.feed::<GuestMsg>(&stream[cut..]).expect("b"));
            prop_assert_eq!(got, msgs);
        }
    }
}

//! The names and addresses of one testbed, and the `ip`/`tc` commands that make, shape
//! and remove it, decided without running anything so that every rule is unit-tested:
//! names fit the kernel's 15 characters, testbeds in different slots never share a
//! name or a subnet, and teardown removes exactly what setup made.
//!
//! Slot `k` owns the namespaces `herd-tb<k>-<i>`, the bridge `htb<k>` and the veths
//! `htb<k>h<i>` (root side) / `htb<k>n<i>` (namespace side), and the subnet
//! 198.18.<k>.0/24 from the range set aside for network benchmarks (RFC 2544), so
//! nothing it does can reach or shadow a real address: the bridge is .1, host `i` is
//! `.(10 + i)`.

use std::net::Ipv4Addr;

/// Slots a machine offers; one testbed per slot at a time.
pub const SLOTS: u8 = 64;
/// Hosts one testbed may have.
pub const MAX_HOSTS: usize = 200;

/// A command line: the program and its arguments.
pub type Cmd = Vec<String>;

pub fn cmd(parts: &[&str]) -> Cmd {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    pub index: usize,
    /// The network namespace.
    pub ns: String,
    /// The veth end on the bridge, in the root namespace.
    pub veth_root: String,
    /// The veth end inside the namespace.
    pub veth_ns: String,
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub slot: u8,
    pub bridge: String,
    /// The bridge's address: where the hosts reach the root namespace (the server).
    pub gateway: Ipv4Addr,
    pub hosts: Vec<HostPlan>,
}

/// How a link is shaped, each way. A rate alone is a token bucket (tbf, in every
/// kernel); delay or loss need the netem qdisc, which a kernel may lack: the testbed
/// then says so instead of shaping less than it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Shape {
    /// 0: no limit.
    pub rate_kbit: u64,
    pub delay_ms: u32,
    /// Percent of packets dropped, 0 to 100.
    pub loss_pct: f64,
}

impl Shape {
    pub fn needs_netem(&self) -> bool {
        self.delay_ms > 0 || self.loss_pct > 0.0
    }
}

impl Plan {
    pub fn new(slot: u8, n_hosts: usize) -> Result<Plan, String> {
        if slot >= SLOTS {
            return Err(format!("slot {slot}: slots are 0 to {}", SLOTS - 1));
        }
        if n_hosts == 0 || n_hosts > MAX_HOSTS {
            return Err(format!("{n_hosts} hosts: a testbed has 1 to {MAX_HOSTS}"));
        }
        let hosts = (0..n_hosts)
            .map(|i| HostPlan {
                index: i,
                ns: ns_name(slot, i),
                veth_root: format!("htb{slot}h{i}"),
                veth_ns: format!("htb{slot}n{i}"),
                // n_hosts <= 200 keeps this within one octet.
                addr: Ipv4Addr::new(198, 18, slot, (10 + i) as u8),
            })
            .collect();
        Ok(Plan {
            slot,
            bridge: bridge_name(slot),
            gateway: Ipv4Addr::new(198, 18, slot, 1),
            hosts,
        })
    }

    /// Everything setup runs, in order.
    pub fn setup(&self) -> Vec<Cmd> {
        let gw = format!("{}/24", self.gateway);
        let mut out = vec![
            cmd(&["ip", "link", "add", &self.bridge, "type", "bridge"]),
            cmd(&["ip", "addr", "add", &gw, "dev", &self.bridge]),
            cmd(&["ip", "link", "set", &self.bridge, "up"]),
        ];
        for h in &self.hosts {
            let addr = format!("{}/24", h.addr);
            out.push(cmd(&["ip", "netns", "add", &h.ns]));
            out.push(cmd(&[
                "ip",
                "link",
                "add",
                &h.veth_root,
                "type",
                "veth",
                "peer",
                "name",
                &h.veth_ns,
                "netns",
                &h.ns,
            ]));
            out.push(cmd(&[
                "ip",
                "link",
                "set",
                &h.veth_root,
                "master",
                &self.bridge,
            ]));
            out.push(cmd(&["ip", "link", "set", &h.veth_root, "up"]));
            out.push(in_ns(
                &h.ns,
                &["ip", "addr", "add", &addr, "dev", &h.veth_ns],
            ));
            out.push(in_ns(&h.ns, &["ip", "link", "set", &h.veth_ns, "up"]));
            out.push(in_ns(&h.ns, &["ip", "link", "set", "lo", "up"]));
        }
        out
    }

    /// Removes what [`Plan::setup`] made (processes inside are the caller's to end
    /// first). Each command may fail harmlessly when its object is already gone.
    pub fn teardown(&self) -> Vec<Cmd> {
        // The pairs go first and by name: a deleted namespace's veth end goes only
        // when the kernel gets round to cleaning the namespace up, and a testbed that
        // claims the slot meanwhile would find the root-side name still taken.
        let mut out: Vec<Cmd> = self
            .hosts
            .iter()
            .map(|h| cmd(&["ip", "link", "delete", &h.veth_root]))
            .collect();
        out.extend(
            self.hosts
                .iter()
                .map(|h| cmd(&["ip", "netns", "delete", &h.ns])),
        );
        out.push(cmd(&["ip", "link", "delete", &self.bridge]));
        out
    }

    pub fn host(&self, i: usize) -> Result<&HostPlan, String> {
        self.hosts
            .get(i)
            .ok_or_else(|| format!("host {i}: this testbed has {}", self.hosts.len()))
    }

    /// Shapes both directions of host `i`'s link (each end's egress), replacing any
    /// earlier shape.
    pub fn shape(&self, i: usize, shape: Shape) -> Result<Vec<Cmd>, String> {
        if !(0.0..=100.0).contains(&shape.loss_pct) {
            return Err(format!(
                "loss: {}% is not between 0 and 100",
                shape.loss_pct
            ));
        }
        if shape.rate_kbit == 0 && !shape.needs_netem() {
            return Err("nothing to shape: give a rate, a delay or a loss".into());
        }
        let h = self.host(i)?;
        let mut qdisc: Vec<String> = Vec::new();
        if shape.needs_netem() {
            qdisc.push("netem".into());
            if shape.delay_ms > 0 {
                qdisc.extend(["delay".into(), format!("{}ms", shape.delay_ms)]);
            }
            if shape.loss_pct > 0.0 {
                qdisc.extend(["loss".into(), format!("{}%", shape.loss_pct)]);
            }
            if shape.rate_kbit > 0 {
                qdisc.extend(["rate".into(), format!("{}kbit", shape.rate_kbit)]);
            }
        } else {
            // A bucket of at least 10 ms at the rate, never under one jumbo frame.
            let burst = (shape.rate_kbit * 1000 / 8 / 100).max(16 * 1024);
            qdisc.extend([
                "tbf".into(),
                "rate".into(),
                format!("{}kbit", shape.rate_kbit),
                "burst".into(),
                burst.to_string(),
                "latency".into(),
                "100ms".into(),
            ]);
        }
        let on = |dev: &str| -> Vec<String> {
            let mut c = cmd(&["tc", "qdisc", "replace", "dev", dev, "root"]);
            c.extend(qdisc.iter().cloned());
            c
        };
        let inner = on(&h.veth_ns);
        let inner: Vec<&str> = inner.iter().map(String::as_str).collect();
        Ok(vec![on(&h.veth_root), in_ns(&h.ns, &inner)])
    }

    /// Removes host `i`'s shaping.
    pub fn unshape(&self, i: usize) -> Result<Vec<Cmd>, String> {
        let h = self.host(i)?;
        Ok(vec![
            cmd(&["tc", "qdisc", "del", "dev", &h.veth_root, "root"]),
            in_ns(&h.ns, &["tc", "qdisc", "del", "dev", &h.veth_ns, "root"]),
        ])
    }

    /// Cuts host `i` off the bridge, both ways: its side of the link goes down, as if
    /// its cable were pulled.
    pub fn cut(&self, i: usize) -> Result<Cmd, String> {
        let h = self.host(i)?;
        Ok(cmd(&["ip", "link", "set", &h.veth_root, "down"]))
    }

    pub fn heal(&self, i: usize) -> Result<Cmd, String> {
        let h = self.host(i)?;
        Ok(cmd(&["ip", "link", "set", &h.veth_root, "up"]))
    }
}

pub fn ns_name(slot: u8, i: usize) -> String {
    format!("herd-tb{slot}-{i}")
}

pub fn bridge_name(slot: u8) -> String {
    format!("htb{slot}")
}

/// Whether a namespace name is one of slot `slot`'s (for sweeping leftovers).
pub fn is_slot_ns(slot: u8, name: &str) -> bool {
    name.strip_prefix(&format!("herd-tb{slot}-"))
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a root-namespace link is one of slot `slot`'s veths (for sweeping).
pub fn is_slot_veth(slot: u8, name: &str) -> bool {
    name.strip_prefix(&format!("htb{slot}h"))
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
}

/// `ip netns exec NS ...`.
pub fn in_ns(ns: &str, command: &[&str]) -> Cmd {
    let mut out = cmd(&["ip", "netns", "exec", ns]);
    out.extend(command.iter().map(|s| (*s).to_owned()));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn bad_sizes_and_slots_are_refused() {
        assert!(Plan::new(0, 0).is_err());
        assert!(Plan::new(0, MAX_HOSTS + 1).is_err());
        assert!(Plan::new(SLOTS, 1).is_err());
        assert!(Plan::new(0, 3).unwrap().host(3).is_err());
    }

    #[test]
    fn teardown_removes_every_namespace_and_the_bridge() {
        let plan = Plan::new(7, 3).unwrap();
        let made: HashSet<String> = plan
            .setup()
            .iter()
            .filter(|c| c[..3] == ["ip", "netns", "add"])
            .map(|c| c[3].clone())
            .collect();
        let removed: HashSet<String> = plan
            .teardown()
            .iter()
            .filter(|c| c[..3] == ["ip", "netns", "delete"])
            .map(|c| c[3].clone())
            .collect();
        assert_eq!(made, removed);
        assert_eq!(
            plan.teardown().last().unwrap(),
            &cmd(&["ip", "link", "delete", "htb7"])
        );
    }

    #[test]
    fn shaping_covers_both_ends_and_refuses_zero() {
        let plan = Plan::new(1, 2).unwrap();
        let rate = Shape {
            rate_kbit: 1_000_000,
            ..Shape::default()
        };
        let cmds = plan.shape(1, rate).unwrap();
        assert!(cmds[0].contains(&"htb1h1".to_owned()));
        assert!(cmds[0].contains(&"tbf".to_owned()));
        assert_eq!(
            cmds[1][..4],
            cmd(&["ip", "netns", "exec", "herd-tb1-1"])[..]
        );
        assert!(cmds[1].contains(&"htb1n1".to_owned()));
        assert!(plan.shape(1, Shape::default()).is_err());
        let lossy = Shape {
            delay_ms: 20,
            loss_pct: 1.5,
            ..rate
        };
        let cmds = plan.shape(0, lossy).unwrap();
        let tail: Vec<&str> = cmds[0][6..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "netem",
                "delay",
                "20ms",
                "loss",
                "1.5%",
                "rate",
                "1000000kbit"
            ]
        );
        let too_lossy = Shape {
            loss_pct: 101.0,
            ..lossy
        };
        assert!(plan.shape(0, too_lossy).is_err());
    }

    #[test]
    fn slot_namespaces_are_recognised_and_no_others() {
        assert!(is_slot_ns(3, "herd-tb3-0"));
        assert!(is_slot_ns(3, "herd-tb3-12"));
        assert!(!is_slot_ns(3, "herd-tb33-1"));
        assert!(!is_slot_ns(3, "herd-tb3-"));
        assert!(!is_slot_ns(3, "herd-tb3-x"));
        assert!(is_slot_veth(3, "htb3h0"));
        assert!(!is_slot_veth(3, "htb33h0"));
        assert!(!is_slot_veth(3, "htb3n0"));
        assert!(!is_slot_veth(3, "htb3"));
        assert!(!is_slot_ns(3, "other"));
    }

    proptest! {
        #[test]
        fn names_fit_and_slots_never_collide(a in 0..SLOTS, b in 0..SLOTS, n in 1..=MAX_HOSTS) {
            let pa = Plan::new(a, n).unwrap();
            let pb = Plan::new(b, n).unwrap();
            for h in &pa.hosts {
                prop_assert!(h.veth_root.len() <= 15 && h.veth_ns.len() <= 15);
                prop_assert!(is_slot_ns(a, &h.ns));
                prop_assert_ne!(h.addr, pa.gateway);
            }
            let addrs: HashSet<_> = pa.hosts.iter().map(|h| h.addr).collect();
            prop_assert_eq!(addrs.len(), n);
            if a != b {
                let names_a: HashSet<_> = pa.hosts.iter().flat_map(|h| [&h.ns, &h.veth_root, &h.veth_ns]).collect();
                prop_assert!(pb.hosts.iter().all(|h| !names_a.contains(&h.ns) && !names_a.contains(&h.veth_root)));
                prop_assert!(pb.hosts.iter().all(|h| !addrs.contains(&h.addr)));
                prop_assert_ne!(&pa.bridge, &pb.bridge);
            }
        }
    }
}

//! Arbitrary JSON documents that look like herd's request bodies.
//!
//! Random bytes almost never parse as JSON, let alone as a body with the right field
//! names (the API refuses unknown fields), so a target that fed raw bytes to the API
//! would test little more than the JSON parser. Objects built here take most of their
//! keys, and many of their string and number values, from the vocabulary of herd's
//! request types, so validation code behind the parser gets exercised too.

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{Map, Number, Value};

/// Field names of the API's request bodies (launch, policy, rate card, join, tokens,
/// users and projects), and a few that are not.
pub const KEYS: &[&str] = &[
    "name",
    "project",
    "hypervisor",
    "vcpus",
    "memory_mib",
    "image",
    "command",
    "policy",
    "keep_running",
    "lifespan",
    "max_seconds",
    "end_at",
    "enforce",
    "action",
    "warn",
    "activation",
    "start_at",
    "after_vm",
    "task",
    "idle",
    "cpu_below_permille",
    "net_below_bps",
    "for_seconds",
    "warmup_seconds",
    "overuse",
    "cpu_above_permille",
    "mem_above_mib",
    "net_above_bps",
    "budget",
    "cpu_seconds",
    "mem_gib_hours_milli",
    "net_bytes",
    "cost_cap",
    "max_micros",
    "rates",
    "per_hour",
    "per_cpu_second",
    "per_gib_hour_memory",
    "per_gib_transferred",
    "peak",
    "off_peak",
    "peak_start_hour",
    "peak_end_hour",
    "errors",
    "max_restarts",
    "join_token",
    "hostname",
    "csr_pem",
    "ttl_seconds",
    "user",
    "role",
    "label",
    "cloud_admin",
    "quota",
    "max_vcpus",
    "max_memory_mib",
    "max_vms",
    "members",
    "budget_micros",
    "token_ttl_seconds",
    "",
    "unknown_field",
];

/// String values with a meaning somewhere in the API. Entries starting with `$` are
/// replaced by the caller (see `api_http`) with values only known at run time.
pub const WORDS: &[&str] = &[
    "vm-1",
    "vm-2",
    "default",
    "acme",
    "sim",
    "qemu",
    "oci",
    "notify",
    "suspend",
    "stop",
    "terminate",
    "start",
    "pause",
    "resume",
    "running",
    "stopped",
    "admin",
    "owner",
    "member",
    "viewer",
    "host-1",
    "2024-01-01T00:00:00Z",
    "-",
    "",
    "$vm",
    "$host",
    "$join_token",
    "$csr",
];

/// Integers at the edges of the API's ranges and of the integer types.
pub const NUMBERS: &[i128] = &[
    0,
    1,
    2,
    15,
    16,
    23,
    24,
    63,
    64,
    255,
    256,
    257,
    999,
    1000,
    3600,
    604_800,
    604_801,
    1 << 20,
    (1 << 20) + 1,
    1 << 31,
    1 << 32,
    i64::MAX as i128,
    u64::MAX as i128,
    -1,
    i64::MIN as i128,
];

/// Fields that go together in one object of one request body. An object generated
/// from a group has no field the API would refuse as unknown.
const LAUNCH: &[&str] = &[
    "name",
    "project",
    "hypervisor",
    "vcpus",
    "memory_mib",
    "image",
    "command",
    "policy",
    "keep_running",
];
const POLICY: &[&str] = &[
    "lifespan",
    "activation",
    "task",
    "idle",
    "overuse",
    "budget",
    "cost_cap",
    "errors",
];
const LIFESPAN: &[&str] = &["max_seconds", "end_at", "enforce"];
const ENFORCE: &[&str] = &["action", "warn"];
const ACTIVATION: &[&str] = &["start_at", "after_vm"];
const TASK: &[&str] = &["enforce"];
const IDLE: &[&str] = &[
    "cpu_below_permille",
    "net_below_bps",
    "for_seconds",
    "warmup_seconds",
    "enforce",
];
const OVERUSE: &[&str] = &[
    "cpu_above_permille",
    "mem_above_mib",
    "net_above_bps",
    "for_seconds",
    "enforce",
];
const BUDGET: &[&str] = &["cpu_seconds", "mem_gib_hours_milli", "net_bytes", "enforce"];
const COST_CAP: &[&str] = &["max_micros", "rates", "enforce"];
const RATE_CARD: &[&str] = &[
    "per_hour",
    "per_cpu_second",
    "per_gib_hour_memory",
    "per_gib_transferred",
    "peak_start_hour",
    "peak_end_hour",
];
const RATE: &[&str] = &["peak", "off_peak"];
const ERRORS: &[&str] = &["max_restarts", "enforce"];
const JOIN: &[&str] = &["join_token", "hostname", "csr_pem"];
const TOKEN: &[&str] = &["ttl_seconds", "label", "user"];
const USER: &[&str] = &[
    "name",
    "cloud_admin",
    "project",
    "role",
    "token_ttl_seconds",
];
const PROJECT: &[&str] = &["name", "quota"];
const QUOTA: &[&str] = &["max_vms", "max_vcpus", "max_memory_mib", "budget_micros"];
const MEMBER: &[&str] = &["role"];

/// The top-level bodies.
const BODIES: &[&[&str]] = &[
    LAUNCH, POLICY, RATE_CARD, JOIN, TOKEN, USER, PROJECT, QUOTA, MEMBER,
];

/// What a field usually holds.
enum Hint {
    Text,
    Flag,
    Texts,
    Object(&'static [&'static str]),
    Integer,
}

fn hint(key: &str) -> Hint {
    match key {
        "name" | "project" | "hypervisor" | "image" | "action" | "join_token" | "hostname"
        | "csr_pem" | "label" | "user" | "role" | "after_vm" => Hint::Text,
        "keep_running" | "cloud_admin" => Hint::Flag,
        "command" => Hint::Texts,
        "policy" => Hint::Object(POLICY),
        "lifespan" => Hint::Object(LIFESPAN),
        "activation" => Hint::Object(ACTIVATION),
        "task" => Hint::Object(TASK),
        "idle" => Hint::Object(IDLE),
        "overuse" => Hint::Object(OVERUSE),
        "budget" => Hint::Object(BUDGET),
        "cost_cap" => Hint::Object(COST_CAP),
        "errors" => Hint::Object(ERRORS),
        "enforce" => Hint::Object(ENFORCE),
        "rates" => Hint::Object(RATE_CARD),
        "per_hour" | "per_cpu_second" | "per_gib_hour_memory" | "per_gib_transferred" => {
            Hint::Object(RATE)
        }
        "quota" => Hint::Object(QUOTA),
        _ => Hint::Integer,
    }
}

/// A JSON document; strings may still hold `$` placeholders.
#[derive(Debug, Clone)]
pub struct Json(pub Value);

impl<'a> Arbitrary<'a> for Json {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Json> {
        if u.ratio(3, 4)? {
            let fields = *u.choose(BODIES)?;
            return Ok(Json(Value::Object(object_of(u, fields, 0)?)));
        }
        Ok(Json(value(u, 0)?))
    }
}

const MAX_DEPTH: u32 = 5;

fn value(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Value> {
    let kinds = if depth >= MAX_DEPTH { 5 } else { 7 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 | 4 => Value::String(string(u)?),
        5 => Value::Number(Number::from_f64(u.arbitrary()?).unwrap_or_else(|| Number::from(0))),
        6 => {
            let n = u.int_in_range(0..=4)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(value(u, depth + 1)?);
            }
            Value::Array(items)
        }
        _ => Value::Object(object(u, depth)?),
    })
}

/// A value for `key`: usually of the kind the field holds, sometimes anything.
fn value_for(u: &mut Unstructured, key: &str, depth: u32) -> arbitrary::Result<Value> {
    if depth >= MAX_DEPTH || u.ratio(1, 8)? {
        return value(u, depth);
    }
    Ok(match hint(key) {
        Hint::Text => Value::String(string(u)?),
        Hint::Flag => Value::Bool(u.arbitrary()?),
        Hint::Texts => {
            let n = u.int_in_range(0..=3)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(Value::String(string(u)?));
            }
            Value::Array(items)
        }
        Hint::Object(fields) => Value::Object(object_of(u, fields, depth + 1)?),
        Hint::Integer => number(u)?,
    })
}

/// An object with some of `fields`, in order, and now and then one field too many.
fn object_of(
    u: &mut Unstructured,
    fields: &[&str],
    depth: u32,
) -> arbitrary::Result<Map<String, Value>> {
    let mut map = Map::new();
    for field in fields {
        if u.ratio(1, 2)? {
            map.insert((*field).to_owned(), value_for(u, field, depth)?);
        }
    }
    if u.ratio(1, 16)? {
        let key = (*u.choose(KEYS)?).to_owned();
        let value = value_for(u, &key, depth)?;
        map.insert(key, value);
    }
    Ok(map)
}

/// An object with up to 8 fields, mostly from [`KEYS`].
pub fn object(u: &mut Unstructured, depth: u32) -> arbitrary::Result<Map<String, Value>> {
    let n = u.int_in_range(0..=8)?;
    let mut map = Map::new();
    for _ in 0..n {
        let key = if u.ratio(7, 8)? {
            (*u.choose(KEYS)?).to_owned()
        } else {
            u.arbitrary()?
        };
        let value = value_for(u, &key, depth + 1)?;
        map.insert(key, value);
    }
    Ok(map)
}

fn number(u: &mut Unstructured) -> arbitrary::Result<Value> {
    let n: i128 = match u.int_in_range(0..=2)? {
        0 => *u.choose(NUMBERS)?,
        1 => i128::from(u.arbitrary::<i64>()?),
        _ => i128::from(u.arbitrary::<u64>()?),
    };
    Ok(if let Ok(n) = u64::try_from(n) {
        Value::from(n)
    } else {
        Value::from(i64::try_from(n).unwrap_or(i64::MIN))
    })
}

fn string(u: &mut Unstructured) -> arbitrary::Result<String> {
    if u.ratio(3, 4)? {
        Ok((*u.choose(WORDS)?).to_owned())
    } else {
        u.arbitrary()
    }
}

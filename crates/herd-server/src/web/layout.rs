//! The frame every page shares (header, navigation, the logout form) and the small
//! pieces pages are built of: state badges, meters, times, action buttons.

use super::Caller;
use axum::http::StatusCode;
use herd_proto::VmState;
use maud::{html, Markup, DOCTYPE};

/// Where a page sits in the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Vms,
    Projects,
    Hosts,
    Billing,
    Audit,
}

impl Section {
    const ALL: [Section; 6] = [
        Section::Overview,
        Section::Vms,
        Section::Projects,
        Section::Hosts,
        Section::Billing,
        Section::Audit,
    ];

    fn label(self) -> &'static str {
        match self {
            Section::Overview => "Overview",
            Section::Vms => "VMs",
            Section::Projects => "Projects",
            Section::Hosts => "Hosts",
            Section::Billing => "Billing",
            Section::Audit => "Audit log",
        }
    }

    fn href(self) -> &'static str {
        match self {
            Section::Overview => "/ui",
            Section::Vms => "/ui/vms",
            Section::Projects => "/ui/projects",
            Section::Hosts => "/ui/hosts",
            Section::Billing => "/ui/billing",
            Section::Audit => "/ui/audit",
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · herd" }
            link rel="stylesheet" href="/ui/assets/herd.css";
            script src="/ui/assets/herd.js" defer {}
        }
    }
}

/// A page of the UI for a logged-in user.
pub fn page(caller: &Caller, section: Section, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui" { "herd" }
                    nav aria-label="Main" {
                        @for s in Section::ALL {
                            @if s != Section::Hosts || caller.is_cloud_admin() {
                                a href=(s.href()) aria-current=[(s == section).then_some("page")] { (s.label()) }
                            }
                        }
                    }
                    div.who {
                        span { (caller.name()) @if caller.is_cloud_admin() { " (cloud admin)" } }
                        form method="post" action="/ui/logout" {
                            (csrf(caller))
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page without the navigation: the login form and errors before a login.
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top { a.brand href="/ui" { "herd" } }
                main id="main" { h1 { (title) } (body) }
            }
        }
    }
}

/// What a refused or failed request shows.
pub fn error_page(status: StatusCode, message: &str) -> Markup {
    let title = match status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::CONFLICT => "Not possible now",
        StatusCode::BAD_REQUEST => "Not understood",
        _ => "Something went wrong",
    };
    bare(
        title,
        html! {
            p.error role="alert" { (message) }
            p { a href="/ui" { "Back to the overview" } }
        },
    )
}

/// The hidden field every form carries.
pub fn csrf(caller: &Caller) -> Markup {
    html! { input type="hidden" name="csrf" value=(caller.session.csrf); }
}

/// A form that is one button: posts to `action`; asks first when `confirm` is given.
pub fn button(caller: &Caller, action: &str, label: &str, confirm: Option<&str>) -> Markup {
    html! {
        form.inline method="post" action=(action) data-confirm=[confirm] {
            (csrf(caller))
            button type="submit" class=[confirm.map(|_| "danger")] { (label) }
        }
    }
}

pub fn state(state: VmState) -> Markup {
    html! { span class={ "state state-" (state.as_str()) } { (state.as_str()) } }
}

/// `part` in thousandths of `whole`, at most 1000; 0 of nothing.
fn permille(part: u64, whole: u64) -> u64 {
    part.saturating_mul(1000)
        .checked_div(whole)
        .unwrap_or(0)
        .min(1000)
}

/// A bar for a share of a whole, with its figure as text for screen readers and
/// without CSS.
pub fn meter(used: u64, total: u64, text: &str) -> Markup {
    let permille = permille(used, total);
    html! {
        span.meter title=(text) {
            meter min="0" max="1000" low="600" high="850" optimum="0" value=(permille) { (text) }
            span.figure { (text) }
        }
    }
}

/// A bar for a figure among others (a chart), in one colour whatever its length.
pub fn bar(value: u64, max: u64, text: &str) -> Markup {
    let permille = permille(value, max);
    html! {
        span.meter title=(text) {
            meter min="0" max="1000" value=(permille) { (text) }
            span.figure { (text) }
        }
    }
}

/// Money in micro-units, to the cent, or to a hundredth of a cent below one unit
/// (short runs cost fractions of a cent).
pub fn money(micros: u64) -> String {
    if micros < 1_000_000 {
        format!("0.{:04}", micros / 100)
    } else {
        format!("{}.{:02}", micros / 1_000_000, micros % 1_000_000 / 10_000)
    }
}

/// A price in micro-units, to the micro-unit (prices per CPU-second are tiny).
pub fn price(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

pub fn mib(mib: u64) -> String {
    if mib >= 10 * 1024 {
        format!("{:.0} GiB", mib as f64 / 1024.0)
    } else if mib >= 1024 {
        format!("{:.1} GiB", mib as f64 / 1024.0)
    } else {
        format!("{mib} MiB")
    }
}

pub fn bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", n as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", n as f64 / 1_073_741_824.0),
    }
}

/// A duration in seconds, as people say it: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
pub fn duration(seconds: u64) -> String {
    match seconds {
        0..=59 => format!("{seconds} s"),
        60..=3599 => format!("{} min", seconds / 60),
        3600..=86_399 => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{} d {} h", seconds / 86_400, seconds % 86_400 / 3600),
    }
}

/// An RFC 3339 time with how long ago it was, as a `<time>` element.
pub fn time(rfc3339: &str) -> Markup {
    let ago = humantime::parse_rfc3339_weak(rfc3339)
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .map(|d| format!("{} ago", duration(d.as_secs())));
    html! {
        time datetime=(rfc3339) title=(rfc3339) { (ago.unwrap_or_else(|| rfc3339.to_owned())) }
    }
}

/// The first eight characters of an id, the way the CLI shows it.
pub fn short(id: &impl ToString) -> String {
    id.to_string().chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(45), "45 s");
        assert_eq!(duration(720), "12 min");
        assert_eq!(duration(3600 * 3 + 300), "3 h 5 min");
        assert_eq!(duration(86_400 * 2 + 3600 * 4), "2 d 4 h");
    }

    #[test]
    fn sizes_read_in_the_unit_that_fits() {
        assert_eq!(mib(512), "512 MiB");
        assert_eq!(mib(1536), "1.5 GiB");
        assert_eq!(mib(64 * 1024), "64 GiB");
        assert_eq!(bytes(2048), "2.0 KiB");
    }

    #[test]
    fn money_shows_cents_or_finer_below_one_unit() {
        assert_eq!(money(5_000_000), "5.00");
        assert_eq!(money(1_239_999), "1.23");
        assert_eq!(money(1_230), "0.0012");
        assert_eq!(money(0), "0.0000");
        assert_eq!(price(10), "0.000010");
    }

    #[test]
    fn a_meter_never_divides_by_zero_nor_overflows() {
        let m = meter(5, 0, "5 of 0").into_string();
        assert!(m.contains("value=\"0\""), "{m}");
        let m = meter(u64::MAX, 2, "lots").into_string();
        assert!(m.contains("value=\"1000\""), "{m}");
    }
}

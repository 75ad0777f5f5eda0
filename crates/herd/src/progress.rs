//! Spinners for long work. indicatif draws nothing when stderr is not a terminal, so
//! piped output carries no control characters.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A spinner on stderr: `<spinner> <prefix>: <message> <elapsed>`.
pub fn spinner(prefix: &str, message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix}: {msg} {elapsed}") {
        bar.set_style(style);
    }
    bar.set_prefix(prefix.to_owned());
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

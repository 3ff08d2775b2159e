//! What the commands print: progress bars on a terminal, a short text summary,
//! or JSON for machines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockstream::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Runs `f` while a thread draws `progress` on stderr (when `enabled`),
/// then prints the warnings the engine recorded.
pub fn with_progress<T>(enabled: bool, progress: &Progress, f: impl FnOnce() -> T) -> T {
    let r = draw_progress(enabled, progress, f);
    for w in progress.take_warnings() {
        eprintln!("blockstream: warning: {w}");
    }
    r
}

fn draw_progress<T>(enabled: bool, progress: &Progress, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            let mut phase = String::new();
            while !done.load(Ordering::Relaxed) {
                let (p, d, t) = progress.snapshot();
                if p != phase {
                    bar.reset();
                    bar.set_prefix(p.clone());
                    phase = p;
                }
                bar.set_length(t);
                bar.set_position(d.min(t));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        r
    })
}

pub fn mib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

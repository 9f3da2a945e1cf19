//! `mqvisor bench ...`: measurements of mqvisor itself, each printed beside
//! its anchor from the same run. Benchmarks print figures; they never judge.

pub mod boot;
pub mod conns;
pub mod echo;
pub mod hostile;
pub mod mqtt;
pub mod serve;
pub mod state;

pub use crate::fd_limit::raise as raise_fd_limit;

/// The value at `fraction` (0..=1) of sorted `values`, nearest rank.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // A float-to-int `as` saturates; the clamp below bounds the rank.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 10.0);
        assert_eq!(percentile(&v, 0.9), 18.0);
        assert_eq!(percentile(&v, 1.0), 20.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}

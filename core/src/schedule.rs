//! When the retention worker's next scheduled sweep is due. The schedule is anchored to the end
//! of the last finished run recorded in `vault.sweep_runs`, not to the worker's start, so a
//! worker restarted more often than its interval (restarts, crashes, `pg_terminate_backend`)
//! still sweeps.

const DAY_S: i64 = 86_400;

/// The Unix time (seconds) the next sweep is due: `interval_s` after `last_s` (the end of the
/// last finished run, or the worker's start when there was none), or, with a daily time of day
/// (`daily_at_s`, seconds after midnight UTC), the first such time after `last_s`. A due time in
/// the past means at once.
pub fn next_sweep_due(last_s: i64, interval_s: i64, daily_at_s: Option<i64>) -> i64 {
    match daily_at_s {
        None => last_s.saturating_add(interval_s.max(1)),
        Some(at) => {
            let candidate = last_s.div_euclid(DAY_S) * DAY_S + at;
            if candidate > last_s {
                candidate
            } else {
                candidate + DAY_S
            }
        }
    }
}

/// `vsql_vault.sweep_at`: empty for none, or `HH:MM` (24-hour, UTC) as seconds after midnight.
pub fn parse_time_of_day(text: &str) -> Result<Option<i64>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || format!("vsql_vault.sweep_at must be HH:MM (UTC, 00:00 to 23:59), not \"{text}\"");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || !digits(m) {
        return Err(bad());
    }
    let (h, m): (i64, i64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(Some(h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-02 00:00:00 UTC
    const MIDNIGHT: i64 = 1_796_169_600;

    #[test]
    fn the_interval_counts_from_the_last_finished_run_not_from_now() {
        let last = MIDNIGHT + 10 * 3600;
        assert_eq!(next_sweep_due(last, 86_400, None), last + 86_400);
        // A worker that restarts every hour still finds the same due time: it does not move.
        assert_eq!(next_sweep_due(last, 86_400, None), MIDNIGHT + 34 * 3600);
        // A zero or negative interval never makes a busy loop.
        assert_eq!(next_sweep_due(last, 0, None), last + 1);
    }

    #[test]
    fn a_daily_time_is_the_first_one_after_the_last_run() {
        let three = 3 * 3600;
        // Last run at 01:00: due at 03:00 the same day.
        assert_eq!(
            next_sweep_due(MIDNIGHT + 3600, 60, Some(three)),
            MIDNIGHT + three
        );
        // Last run at 03:00 exactly, or at 05:00: due at 03:00 the next day.
        assert_eq!(
            next_sweep_due(MIDNIGHT + three, 60, Some(three)),
            MIDNIGHT + DAY_S + three
        );
        assert_eq!(
            next_sweep_due(MIDNIGHT + 5 * 3600, 60, Some(three)),
            MIDNIGHT + DAY_S + three
        );
        // Last run two days ago: overdue, so the caller sweeps at once.
        assert!(next_sweep_due(MIDNIGHT - 2 * DAY_S, 60, Some(three)) < MIDNIGHT);
    }

    #[test]
    fn times_of_day_are_hh_mm_in_utc() {
        assert_eq!(parse_time_of_day(""), Ok(None));
        assert_eq!(parse_time_of_day(" 03:00 "), Ok(Some(3 * 3600)));
        assert_eq!(parse_time_of_day("23:59"), Ok(Some(23 * 3600 + 59 * 60)));
        for bad in [
            "3:00", "24:00", "03:60", "03-00", "0300", "ab:cd", "03:00:00", "+3:00",
        ] {
            assert!(parse_time_of_day(bad).is_err(), "{bad}");
        }
    }
}

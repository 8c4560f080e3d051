//! The step table `cargo xtask test` prints: how long each step took, so the cost of any
//! change to the build, the tests or the notebooks is visible in every CI log.

use std::time::{Duration, Instant};

use anyhow::Result;

/// Named, timed steps, in the order they ran.
pub struct Steps {
    start: Instant,
    rows: Vec<(String, Duration)>,
}

impl Steps {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            rows: Vec::new(),
        }
    }

    /// Runs `step`, recording its time under `name` whether it succeeds or fails.
    pub fn time<T>(&mut self, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let result = step();
        self.record(name, start.elapsed());
        result
    }

    /// Records a step timed elsewhere (a test binary, a notebook).
    pub fn record(&mut self, name: &str, took: Duration) {
        self.rows.push((name.to_string(), took));
    }

    /// Appends the steps `other` recorded (another thread's), keeping this table's start.
    pub fn append(&mut self, other: Steps) {
        self.rows.extend(other.rows);
    }

    /// The table: one line a step, then the total wall time since [`Steps::new`].
    pub fn table(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let line = |name: &str, took: Duration| {
            let s = took.as_secs_f64();
            format!("  {name:<width$}  {s:>7.0} s  {:>5.1} min\n", s / 60.0)
        };
        let mut out = String::from("xtask: step times\n");
        for (name, took) in &self.rows {
            out += &line(name, *took);
        }
        out + &line("total", self.start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::Steps;
    use std::time::Duration;

    #[test]
    fn the_table_lists_each_step_and_the_total_also_after_a_failure() {
        let mut steps = Steps::new();
        steps.record("build tests", Duration::from_secs(90));
        let failed: anyhow::Result<()> = steps.time("notebook 01-first-cnn", || anyhow::bail!("x"));
        assert!(failed.is_err());
        let table = steps.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "xtask: step times");
        assert!(lines[1].starts_with("  build tests  ") && lines[1].ends_with("90 s    1.5 min"));
        assert!(lines[2].starts_with("  notebook 01-first-cnn"));
        assert!(lines[3].starts_with("  total"));
        assert_eq!(lines.len(), 4);
    }
}

//! What a child process wrote on stderr, kept small: the last lines (for
//! an error message when it dies) and the problems it reported (warnings,
//! errors and tunnels that ended in failure), counted over the whole bench
//! so that a tunnel misbehaving without failing a workload still shows.

use std::collections::VecDeque;

/// Lines of stderr kept for error messages.
const TAIL_LINES: usize = 40;
/// Problem lines kept as examples.
const PROBLEM_EXAMPLES: usize = 5;

#[derive(Default)]
pub struct ChildLog {
    tail: VecDeque<String>,
    problems: VecDeque<String>,
    problem_count: u64,
}

impl ChildLog {
    pub fn push(&mut self, line: String) {
        if is_problem(&line) {
            self.problem_count += 1;
            keep_last(&mut self.problems, line.clone(), PROBLEM_EXAMPLES);
        }
        keep_last(&mut self.tail, line, TAIL_LINES);
    }

    /// The last `n` lines.
    pub fn last(&self, n: usize) -> Vec<String> {
        let skip = self.tail.len().saturating_sub(n);
        self.tail.iter().skip(skip).cloned().collect()
    }

    /// The most recent problem lines, oldest first.
    pub fn problems(&self) -> Vec<String> {
        self.problems.iter().cloned().collect()
    }

    /// Problem lines seen since the child started.
    pub fn problem_count(&self) -> u64 {
        self.problem_count
    }
}

fn keep_last(lines: &mut VecDeque<String>, line: String, limit: usize) {
    if lines.len() == limit {
        lines.pop_front();
    }
    lines.push_back(line);
}

/// A warning or error, or an access-log record of a tunnel that did not
/// end cleanly (`result=` other than `done`).
fn is_problem(line: &str) -> bool {
    line.contains(" WARN ")
        || line.contains(" ERROR ")
        || (line.contains(" result=") && !line.contains(" result=done"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_problems_and_keeps_the_tail() {
        let mut log = ChildLog::default();
        log.push("t  INFO hbone::access: tunnel closed sent=1 result=done".into());
        log.push(
            "t  INFO hbone::access: tunnel closed sent=1 result=reset detail=\"connection reset\""
                .into(),
        );
        log.push("t  WARN hbone::entry::forward: forward: tunnel failed".into());
        for i in 0..100 {
            log.push(format!("t  INFO line {i}"));
        }
        assert_eq!(log.problem_count(), 2);
        assert_eq!(log.problems().len(), 2);
        assert_eq!(log.last(2), vec!["t  INFO line 98", "t  INFO line 99"]);
    }
}

//! Stop strings over a stream of text deltas.
//!
//! Text is held back until it cannot be the start of a stop string, so a stop string split across deltas
//! ("...<|" + "end|>") is still caught and never emitted:
//!
//! ```text
//!   pending = held-back text + delta
//!   stop found at i      → emit pending[..i], finished
//!   otherwise            → emit all but the longest suffix that is a prefix of some stop string
//! ```

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to emit after a delta.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text safe to emit (may be empty); generation goes on.
    Continue(String),
    /// A stop string matched: emit this text and stop. The stop string itself is dropped.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        if let Some(i) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..i].to_string();
            self.pending.clear();
            return StopOutcome::Stopped(out);
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text generated before the request may stop (vLLM's `min_tokens`): never stops, but still holds
    /// back a suffix that could start a stop string, so one that straddles the boundary is caught by the
    /// next `push`. A stop string complete before the boundary is emitted as text.
    pub fn push_unarmed(&mut self, delta: &str) -> String {
        if self.stops.is_empty() {
            return delta.to_string();
        }
        self.pending.push_str(delta);
        let cut = self.pending.len() - self.held_suffix_len();
        self.pending.drain(..cut).collect()
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(p.len());
            for len in (best + 1..=max).rev() {
                let start = p.len() - len;
                if p.is_char_boundary(start) && s.starts_with(&p[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }

    /// Held-back text, released when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_deltas_is_caught_and_not_emitted() {
        assert_eq!(run(&["END"], &["hello E", "N", "D more"]), ("hello ".into(), true));
    }

    #[test]
    fn unarmed_text_never_stops_but_a_straddling_stop_is_caught() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        // Complete before the boundary: emitted as text.
        assert_eq!(m.push_unarmed("an END, then E"), "an END, then ");
        // Straddling: "E" held back before the boundary, "ND" after it completes the stop.
        assert_eq!(m.push("ND tail"), StopOutcome::Stopped(String::new()));
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push_unarmed("x E"), "x ");
        assert_eq!(m.push("NX"), StopOutcome::Continue("ENX".into()));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["a E", "NX", "b"]), ("a ENXb".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        assert_eq!(run(&["éé"], &["aé", "b"]), ("aéb".into(), false));
        assert_eq!(run(&["😀!"], &["x😀", "!y"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_not_emitted_early() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("abST"), StopOutcome::Continue("ab".into()));
        assert_eq!(m.push("O"), StopOutcome::Continue(String::new()));
        assert_eq!(m.flush(), "STO");
    }
}

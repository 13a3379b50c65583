//! N-gram prompt lookup, the speculative proposer that needs no draft model (#20): the tokens that followed
//! the most recent earlier occurrence of a sequence's last `n` tokens, trying the longest `n` first.
//!
//! Plain data in, plain data out: the runner's proposer calls it per sequence after each step.

/// Up to `k` proposed tokens after `tokens` (a sequence's prompt and output so far): for `n` from `max_n`
/// down to `min_n`, the most recent earlier occurrence of the last `n` tokens, and the tokens after it (those
/// may run into the suffix itself, as in a repeating pattern). Empty when no n-gram recurs.
pub fn propose(tokens: &[u32], min_n: usize, max_n: usize, k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 || min_n == 0 {
        return Vec::new();
    }
    for n in (min_n..=max_n.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Earlier occurrences start at `i < len - n`; the most recent one wins.
        if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == suffix) {
            let from = i + n;
            return tokens[from..len.min(from + k)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::propose;

    #[test]
    fn the_longest_most_recent_match_proposes_what_followed_it() {
        // "a b c d | x a b c e | ... a b c" : the last 3-gram "a b c" last occurred before "e".
        let t = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3];
        assert_eq!(propose(&t, 1, 3, 2), vec![5, 7]);
        assert_eq!(propose(&t, 1, 3, 10), vec![5, 7, 1, 2, 3], "up to the end of the known tokens");
        // A longer n-gram is preferred over a more recent shorter one.
        let t = [8, 2, 3, 6, 5, 3, 7, 8, 2, 3];
        assert_eq!(propose(&t, 1, 3, 1), vec![6], "the 3-gram 8 2 3 matched, not the recent 1-gram 3");
        assert_eq!(propose(&t, 1, 1, 1), vec![7], "with n = 1 only, the most recent 3");
    }

    #[test]
    fn no_match_or_no_room_proposes_nothing() {
        assert!(propose(&[1, 2, 3, 4], 1, 3, 4).is_empty());
        assert!(propose(&[], 1, 3, 4).is_empty());
        assert!(propose(&[5], 1, 3, 4).is_empty());
        assert!(propose(&[5, 5], 1, 3, 0).is_empty());
        assert!(propose(&[1, 2, 1, 2], 3, 3, 4).is_empty(), "min_n above any match");
    }

    #[test]
    fn a_repeating_run_proposes_its_continuation() {
        // 7 7 7 7: the last 3-gram occurs at 0, followed by the last 7 itself.
        assert_eq!(propose(&[7, 7, 7, 7], 1, 3, 3), vec![7]);
        assert_eq!(propose(&[1, 2, 1, 2, 1, 2], 2, 4, 4), vec![1, 2]);
    }
}

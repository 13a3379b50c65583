//! The golden criterion shared by every device: greedy output ids against a reference file's.

use serde_json::Value;

/// Output ids compared per prompt.
pub const COMPARE: usize = 32;
/// A first difference where the reference's top-1/top-2 logit gap is under this is a near-tie.
pub const NEAR_TIE: f64 = 0.5;

/// A JSON array of ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("an array of ids").iter().map(|x| x.as_u64().expect("an id") as u32).collect()
}

/// Runs `generate(item index, item, prompt ids) → greedy output ids` (at least `COMPARE` of them unless it
/// stopped) over every item of the reference file `ref_file` and asserts that each output is identical to
/// the reference over the first `COMPARE` ids, or first differs where the reference's top-1/top-2 logit gap is
/// under `NEAR_TIE` (where the file also has exact-arithmetic gaps, a position is a near-tie if either says
/// so: a quantized peer's own rounding can open a gap the model does not have). Returns how many were
/// identical.
pub fn check_greedy(ref_file: &str, mut generate: impl FnMut(usize, &Value, &[u32]) -> Vec<u32>) -> usize {
    let refs = crate::reference(ref_file);
    let items = refs["items"].as_array().expect("items");
    let (mut failures, mut identical) = (Vec::new(), 0);
    for (n, item) in items.iter().enumerate() {
        let prompt_ids = ids(&item["prompt_ids"]);
        let ours = generate(n, item, &prompt_ids);
        let want = ids(&item["output_ids"]);
        let floats = |key: &str| -> Option<Vec<f64>> {
            item[key].as_array().map(|a| a.iter().map(|v| v.as_f64().expect("a number")).collect())
        };
        let gaps = floats("step_gaps").expect("step_gaps");
        let f32_gaps = floats("f32_step_gaps");
        let limit = COMPARE.min(want.len());
        match (0..limit).find(|&j| ours.get(j) != Some(&want[j])) {
            None => {
                identical += 1;
                println!("item {n:2}: identical ({limit} tokens)");
            }
            Some(j) => {
                let f32_gap = f32_gaps.as_ref().map(|f| f[j]);
                let gap = f32_gap.map_or(gaps[j], |f| f.min(gaps[j]));
                println!(
                    "item {n:2}: first difference at position {j}, reference gap {:.4}{} (ours {:?}, reference {})",
                    gaps[j],
                    f32_gap.map(|f| format!(", exact f32 gap {f:.4}")).unwrap_or_default(),
                    ours.get(j),
                    want[j]
                );
                if gap >= NEAR_TIE {
                    failures.push(format!("item {n}: diverged at position {j} where the reference gap is {gap:.4}"));
                }
            }
        }
    }
    println!("{ref_file}: {identical}/{} identical over the first {COMPARE} tokens", items.len());
    assert!(failures.is_empty(), "divergences at non-tie positions:\n{}", failures.join("\n"));
    identical
}

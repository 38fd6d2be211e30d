//! Times `TextOp::from_patches` on one op made of many one-code-point inserts at
//! scattered positions in a 23,000-code-point document: the shape of op that once held
//! a document's lock for most of a minute. Prints the times; asserts nothing.
//!
//! ```text
//! cargo run --release --example from_patches_time            # 16,000 and 60,000 patches
//! cargo run --release --example from_patches_time -- 1000 4000
//! ```

use std::time::Instant;

use quire::op::Patch;
use quire::ot::TextOp;

const BASE_CHARS: u32 = 23_000;
const ROUNDS: usize = 3;
/// A round slower than this is not repeated: one is enough to see it.
const ROUND_SLOW_SECS: f64 = 10.0;

/// xorshift64: reproducible positions without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `count` one-code-point inserts, each at a random position of the text the earlier
/// ones left.
fn scattered_inserts(count: u32, seed: u64) -> Vec<Patch> {
    let mut state = seed;
    (0..count)
        .map(|i| {
            let len = BASE_CHARS + i;
            let pos = (next(&mut state) % (u64::from(len) + 1)) as u32;
            Patch::new(pos, 0, "x")
        })
        .collect()
}

fn main() {
    let counts: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a patch count"))
        .collect();
    let counts = if counts.is_empty() {
        vec![16_000, 60_000]
    } else {
        counts
    };
    for count in counts {
        let patches = scattered_inserts(count, 0x9E37_79B9_7F4A_7C15);
        let mut times_ms = Vec::with_capacity(ROUNDS);
        let mut components = 0;
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let op = TextOp::from_patches(&patches);
            times_ms.push(start.elapsed().as_secs_f64() * 1e3);
            components = op.components().len();
            if times_ms
                .last()
                .is_some_and(|ms| *ms > ROUND_SLOW_SECS * 1e3)
            {
                break;
            }
        }
        let times: Vec<String> = times_ms.iter().map(|t| format!("{t:.1}")).collect();
        println!(
            "from_patches: {count} inserts on {BASE_CHARS} code points -> {components} components; ms per round: {}",
            times.join(", ")
        );
    }
}

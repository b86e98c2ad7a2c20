//! Statistics of the timing audits (`tests/examples/*_audit.rs`, run by
//! `scripts/timing-audit`): a two-sample Kolmogorov–Smirnov test, a median
//! and a seeded coin, so each audit states only what it times.

/// The verdict of an audit: across tenants the timings must not be told
/// apart (p ≥ this), within one tenant hits and misses must be (p < this).
pub const SIGNIFICANCE: f64 = 0.01;

/// The two-sample KS statistic D and its asymptotic p-value (the chance of
/// a D this large if both samples came from one distribution).
pub fn ks(a: &[f64], b: &[f64]) -> (f64, f64) {
    assert!(!a.is_empty() && !b.is_empty(), "two non-empty samples");
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    let en = (n * m / (n + m)).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    (d, q_ks(lambda))
}

/// The Kolmogorov distribution's tail, Q(λ) = P(K > λ). The alternating
/// series 2 Σ (-1)^(k-1) e^(-2k²λ²) does not converge for small λ, where
/// the dual (Jacobi theta) form 1 - √(2π)/λ Σ e^(-(2j-1)²π²/(8λ²)) does.
fn q_ks(lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 1.0;
    }
    let p = if lambda < 1.18 {
        let s: f64 = (1..=20)
            .map(|j| {
                let odd = f64::from(2 * j - 1);
                (-odd * odd * std::f64::consts::PI.powi(2) / (8.0 * lambda * lambda)).exp()
            })
            .sum();
        1.0 - (2.0 * std::f64::consts::PI).sqrt() / lambda * s
    } else {
        (1..=100)
            .map(|k| {
                let k = f64::from(k);
                let sign = if k as u32 % 2 == 1 { 1.0 } else { -1.0 };
                2.0 * sign * (-2.0 * k * k * lambda * lambda).exp()
            })
            .sum()
    };
    p.clamp(0.0, 1.0)
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A xorshift64 stream: the audits' coin flips and random prompts, the
/// same on every run.
#[derive(Debug, Clone)]
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `len` token ids below `vocab`.
    pub fn tokens(&mut self, len: usize, vocab: u32) -> Vec<u32> {
        (0..len)
            .map(|_| (self.next_u64() % u64::from(vocab)) as u32)
            .collect()
    }
}

/// Prints the two comparisons of an audit and fails unless the
/// across-tenant one shows no difference while the control does.
pub fn verdict(
    what: &str,
    unit: &str,
    across: (&[f64], &[f64]),
    within: (&[f64], &[f64]),
) -> Result<(), String> {
    let (d_across, p_across) = ks(across.0, across.1);
    let (d_within, p_within) = ks(within.0, within.1);
    println!("{what}");
    println!(
        "  tenant B, A's cached prompts vs decoys: median {:.1} vs {:.1} {unit}, KS D = {d_across:.3}, p = {p_across:.3}",
        median(across.0),
        median(across.1)
    );
    println!(
        "  tenant A, hits vs misses (control):     median {:.1} vs {:.1} {unit}, KS D = {d_within:.3}, p = {p_within:.2e}",
        median(within.0),
        median(within.1)
    );
    let leak = p_across < SIGNIFICANCE;
    let control = p_within < SIGNIFICANCE;
    println!(
        "  across tenants: {}; control: {}",
        if leak {
            "DISTINGUISHABLE (p < 0.01): a timing leak"
        } else {
            "indistinguishable (p >= 0.01)"
        },
        if control {
            "hits and misses distinguishable, as they should be"
        } else {
            "hits and misses NOT distinguishable: the audit is blind"
        }
    );
    match (leak, control) {
        (false, true) => Ok(()),
        (true, _) => Err(format!(
            "{what}: tenant B can tell A's cached prompts apart"
        )),
        (false, false) => Err(format!("{what}: the control failed, the audit is blind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_tells_shifted_samples_apart_and_not_equal_ones() {
        let a: Vec<f64> = (0..300).map(f64::from).collect();
        let shuffled: Vec<f64> = (0..300).rev().map(f64::from).collect();
        let (d, p) = ks(&a, &shuffled);
        assert_eq!(d, 0.0);
        assert!(p > 0.99, "p = {p}");
        let shifted: Vec<f64> = (0..300).map(|x| f64::from(x) + 60.0).collect();
        let (d, p) = ks(&a, &shifted);
        assert!((d - 0.2).abs() < 1e-9, "D = {d}");
        assert!(p < 1e-4, "p = {p}");
        // Two draws from one uniform stream: not told apart.
        let mut r = Xorshift::new(7);
        let u: Vec<f64> = (0..400).map(|_| (r.next_u64() % 1000) as f64).collect();
        let v: Vec<f64> = (0..400).map(|_| (r.next_u64() % 1000) as f64).collect();
        assert!(ks(&u, &v).1 > SIGNIFICANCE);
    }

    #[test]
    fn the_kolmogorov_tail_is_continuous_and_known() {
        // Q(1.36) = 0.049 and Q(1.63) = 0.0098: the familiar 5% and 1%
        // critical values; both forms agree where they meet.
        assert!((q_ks(1.36) - 0.0494).abs() < 1e-3, "{}", q_ks(1.36));
        assert!((q_ks(1.63) - 0.0098).abs() < 1e-3, "{}", q_ks(1.63));
        assert!((q_ks(0.5) - 0.9639).abs() < 1e-3, "{}", q_ks(0.5));
        assert_eq!(q_ks(0.0), 1.0);
        assert!((q_ks(1.18 - 1e-9) - q_ks(1.18)).abs() < 1e-6);
    }

    #[test]
    fn the_verdict_needs_both_halves() {
        let same: Vec<f64> = (0..200).map(f64::from).collect();
        let far: Vec<f64> = (0..200).map(|x| f64::from(x) + 500.0).collect();
        assert!(verdict("ok", "us", (&same, &same), (&same, &far)).is_ok());
        assert!(verdict("leak", "us", (&same, &far), (&same, &far)).is_err());
        assert!(verdict("blind", "us", (&same, &same), (&same, &same)).is_err());
    }
}

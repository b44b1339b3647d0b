//! RFC 6962 / 9162 Merkle trees: one signature per sweep covers every purge proof in it, and each
//! proof keeps its inclusion path, so it verifies alone with the public key.

use sha2::{Digest, Sha256};

pub fn leaf_hash(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Largest power of two strictly smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The root over leaf hashes (MTH of RFC 6962); the empty tree's root is SHA-256 of nothing.
pub fn root(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The same root as `root`, built one leaf at a time with O(log n) state: a stack of the roots of
/// perfect subtrees, sizes strictly decreasing from the bottom. RFC 6962's tree is left-balanced,
/// so every leaf added merges the equal-sized subtrees on top, and the final root folds the stack
/// from the right (`incremental_root_equals_the_reference_root`). A table digest streams its rows
/// through this, whatever their number.
#[derive(Debug, Clone, Default)]
pub struct RootBuilder {
    stack: Vec<(u64, [u8; 32])>,
    count: u64,
}

impl RootBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a leaf by its leaf hash (`leaf_hash`).
    pub fn push(&mut self, leaf: [u8; 32]) {
        let mut node = (1u64, leaf);
        while let Some(&(size, left)) = self.stack.last() {
            if size != node.0 {
                break;
            }
            self.stack.pop();
            node = (size * 2, node_hash(&left, &node.1));
        }
        self.stack.push(node);
        self.count += 1;
    }

    /// The number of leaves added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The root of the leaves added so far (MTH; SHA-256 of nothing for none).
    pub fn root(&self) -> [u8; 32] {
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut r)) = it.next() else {
            return Sha256::digest([]).into();
        };
        for (_, left) in it {
            r = node_hash(left, &r);
        }
        r
    }
}

/// The root and every leaf's audit path at once, in O(n log n): a sweep batch needs all of them,
/// and computing each path alone would cost O(n) hashing per leaf.
pub fn root_and_paths(leaves: &[[u8; 32]]) -> ([u8; 32], Vec<Vec<[u8; 32]>>) {
    match leaves.len() {
        0 => (root(leaves), Vec::new()),
        1 => (leaves[0], vec![Vec::new()]),
        n => {
            let k = split(n);
            let (left_root, mut left) = root_and_paths(&leaves[..k]);
            let (right_root, right) = root_and_paths(&leaves[k..]);
            left.iter_mut().for_each(|p| p.push(right_root));
            left.extend(right.into_iter().map(|mut p| {
                p.push(left_root);
                p
            }));
            (node_hash(&left_root, &right_root), left)
        }
    }
}

/// The audit path of leaf `index` (PATH of RFC 6962), nearest sibling first.
pub fn inclusion_path(leaves: &[[u8; 32]], index: usize) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_path(&leaves[..k], index);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_path(&leaves[k..], index - k);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Verifies that `leaf` is leaf `index` of a tree of `size` leaves with root `root`
/// (the algorithm of RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(
    leaf: &[u8; 32],
    index: u64,
    size: u64,
    path: &[[u8; 32]],
    root: &[u8; 32],
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn every_leaf_of_every_size_verifies() {
        for n in 1..=40 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let p = inclusion_path(&l, i);
                assert!(
                    verify_inclusion(&l[i], i as u64, n as u64, &p, &r),
                    "n={n} i={i}"
                );
                // A wrong index, a wrong leaf or a wrong size fails.
                if n > 1 {
                    assert!(
                        !verify_inclusion(&l[i], ((i + 1) % n) as u64, n as u64, &p, &r),
                        "n={n} i={i}"
                    );
                    assert!(!verify_inclusion(
                        &l[(i + 1) % n],
                        i as u64,
                        n as u64,
                        &p,
                        &r
                    ));
                }
                // (A different tree size may still fit a path; the signed root message binds the
                // size, which is what makes that harmless.)
            }
        }
    }

    #[test]
    fn all_paths_at_once_match_one_at_a_time() {
        for n in 0..=33 {
            let l = leaves(n);
            let (r, paths) = root_and_paths(&l);
            assert_eq!(r, root(&l));
            assert_eq!(paths.len(), n);
            for (i, p) in paths.iter().enumerate() {
                assert_eq!(*p, inclusion_path(&l, i), "n={n} i={i}");
            }
        }
    }

    #[test]
    fn incremental_root_equals_the_reference_root() {
        for n in 0..=300 {
            let l = leaves(n);
            let mut b = RootBuilder::new();
            for h in &l {
                b.push(*h);
            }
            assert_eq!(b.count(), n as u64);
            assert_eq!(b.root(), root(&l), "n={n}");
            // The stack holds one subtree per set bit of n: O(log n).
            assert_eq!(b.stack.len(), n.count_ones() as usize);
        }
    }

    #[test]
    fn rfc6962_shape_for_three_leaves() {
        let l = leaves(3);
        let expected = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(root(&l), expected);
        assert_eq!(inclusion_path(&l, 2), vec![node_hash(&l[0], &l[1])]);
    }

    #[test]
    fn leaf_and_node_hashes_are_domain_separated() {
        let a = leaf_hash(b"x");
        let b = leaf_hash(b"y");
        let mut concat = Vec::new();
        concat.extend_from_slice(&a);
        concat.extend_from_slice(&b);
        assert_ne!(node_hash(&a, &b), leaf_hash(&concat));
    }
}

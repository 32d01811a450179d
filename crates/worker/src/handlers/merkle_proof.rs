//! `merkle_proof`: a SHA-256 Merkle tree over the given leaves, and the inclusion proof of one.
//!
//! Payload: `{"leaves":["0x..", ...],"leaf_index":i}`; leaves are hex byte strings, with or
//! without `0x`. Result: `{"root":"0x..","leaf":"0x..","leaf_index":i,"proof":[{"hash":"0x..",
//! "position":"left"|"right"}, ...]}` where `leaf` is the leaf's hash and the proof runs from the
//! leaf level up.
//!
//! The tree: each leaf is hashed as `SHA-256(leaf bytes)`, each internal node as
//! `SHA-256(left || right)`; a level with an odd count pairs its last node with itself. A proof
//! step's `position` is the side its sibling sits on: `left` means `SHA-256(sibling || node)`.
//! [`verify`] checks a proof.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{json_result, parse_payload};
use crate::{Handler, TaskContext, TaskFailure};

/// The most leaves one task may hash.
pub const MAX_LEAVES: usize = 1_000_000;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Builds a Merkle tree and the proof for one leaf.
#[derive(Debug, Clone, Copy, Default)]
pub struct MerkleProof;

/// On which side of the path a proof step's sibling sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    /// The parent is `H(sibling || node)`.
    Left,
    /// The parent is `H(node || sibling)`.
    Right,
}

/// One step of an inclusion proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProofStep {
    pub hash: Hash,
    pub position: Position,
}

/// The hash of a leaf: `SHA-256(leaf)`.
pub fn hash_leaf(leaf: &[u8]) -> Hash {
    Sha256::digest(leaf).into()
}

/// The hash of an internal node: `SHA-256(left || right)`.
pub fn hash_node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root over `leaf_hashes` and the proof of the one at `index`; `None` if there are no
/// leaves or `index` is out of range.
pub fn prove(leaf_hashes: &[Hash], index: usize) -> Option<(Hash, Vec<ProofStep>)> {
    if index >= leaf_hashes.len() {
        return None;
    }
    let mut level = leaf_hashes.to_vec();
    let mut index = index;
    let mut proof = Vec::with_capacity(usize::BITS as usize);
    while level.len() > 1 {
        // The last node of an odd level is its own sibling, on the right.
        let step = if index % 2 == 1 {
            ProofStep { hash: level[index - 1], position: Position::Left }
        } else {
            ProofStep { hash: *level.get(index + 1).unwrap_or(&level[index]), position: Position::Right }
        };
        proof.push(step);
        level = next_level(&level);
        index /= 2;
    }
    Some((level[0], proof))
}

/// The root over `leaf_hashes`; `None` if there are none.
pub fn root(leaf_hashes: &[Hash]) -> Option<Hash> {
    let mut level = leaf_hashes.to_vec();
    while level.len() > 1 {
        level = next_level(&level);
    }
    level.first().copied()
}

fn next_level(level: &[Hash]) -> Vec<Hash> {
    level.chunks(2).map(|pair| hash_node(&pair[0], pair.get(1).unwrap_or(&pair[0]))).collect()
}

/// Whether `proof` leads from `leaf_hash` to `root`.
pub fn verify(root: &Hash, leaf_hash: &Hash, proof: &[ProofStep]) -> bool {
    let node = proof.iter().fold(*leaf_hash, |node, step| match step.position {
        Position::Left => hash_node(&step.hash, &node),
        Position::Right => hash_node(&node, &step.hash),
    });
    &node == root
}

/// `0x` and lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Hex bytes with or without `0x`.
pub fn from_hex(s: &str) -> Result<Vec<u8>, hex::FromHexError> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    hex::decode(digits)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    leaves: Vec<String>,
    leaf_index: u64,
}

#[derive(Debug, Serialize)]
struct Answer {
    root: String,
    leaf: String,
    leaf_index: u64,
    proof: Vec<Step>,
}

#[derive(Debug, Serialize)]
struct Step {
    hash: String,
    position: Position,
}

fn bad(problem: impl std::fmt::Display) -> TaskFailure {
    TaskFailure::permanent(format!("invalid merkle_proof payload: {problem}"))
}

/// Parses, hashes and proves; all the CPU work of the handler.
fn build(payload: &[u8]) -> Result<Vec<u8>, TaskFailure> {
    let Payload { leaves, leaf_index } =
        parse_payload("merkle_proof", payload, r#"{"leaves":["0x..", ...],"leaf_index":i}"#)?;
    if leaves.is_empty() {
        return Err(bad("no leaves"));
    }
    if leaves.len() > MAX_LEAVES {
        return Err(bad(format!("{} leaves; at most {MAX_LEAVES} per task", leaves.len())));
    }
    let index = usize::try_from(leaf_index)
        .ok()
        .filter(|&i| i < leaves.len())
        .ok_or_else(|| bad(format!("leaf_index {leaf_index} is out of range for {} leaves", leaves.len())))?;
    let hashes = leaves
        .iter()
        .enumerate()
        .map(|(i, leaf)| {
            from_hex(leaf).map(|bytes| hash_leaf(&bytes)).map_err(|e| {
                let shown: String = leaf.chars().take(40).collect();
                let more = if shown.len() < leaf.len() { "..." } else { "" };
                bad(format!("leaves[{i}] ({shown:?}{more}) is not hex: {e}"))
            })
        })
        .collect::<Result<Vec<Hash>, TaskFailure>>()?;
    let (root, proof) = prove(&hashes, index).expect("index checked above");
    json_result(&Answer {
        root: to_hex(&root),
        leaf: to_hex(&hashes[index]),
        leaf_index,
        proof: proof.iter().map(|s| Step { hash: to_hex(&s.hash), position: s.position }).collect(),
    })
}

#[tonic::async_trait]
impl Handler for MerkleProof {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        // Small trees inline; big ones (up to a million hashes and more) off the runtime.
        if task.payload.len() <= 64 * 1024 {
            return build(&task.payload);
        }
        let payload = task.payload;
        tokio::task::spawn_blocking(move || build(&payload))
            .await
            .unwrap_or_else(|e| Err(TaskFailure::permanent(format!("merkle_proof failed: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::handlers::test_support::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| hash_leaf(&(i as u32).to_be_bytes())).collect()
    }

    fn sha(parts: &[&[u8]]) -> Hash {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }

    #[test]
    fn every_index_of_trees_of_1_to_17_leaves_verifies() {
        for n in 1..=17 {
            let hashes = leaves(n);
            let expected_root = root(&hashes).unwrap();
            let depth = usize::BITS - (n - 1).leading_zeros();
            for i in 0..n {
                let (r, proof) = prove(&hashes, i).unwrap();
                assert_eq!(r, expected_root, "n={n} i={i}");
                assert_eq!(proof.len(), depth as usize, "n={n} i={i}");
                assert!(verify(&r, &hashes[i], &proof), "n={n} i={i}");
                // Not a proof for any other leaf.
                for (j, other) in hashes.iter().enumerate() {
                    if other != &hashes[i] {
                        assert!(!verify(&r, other, &proof), "n={n} i={i} j={j}");
                    }
                }
            }
            assert!(prove(&hashes, n).is_none());
        }
        assert!(prove(&[], 0).is_none());
        assert!(root(&[]).is_none());
    }

    #[test]
    fn a_small_root_by_hand() {
        // Three leaves: the third is paired with itself.
        let (a, b, c) = (sha(&[b"\x01"]), sha(&[b"\x02\x03"]), sha(&[b""]));
        let ab = sha(&[&a, &b]);
        let cc = sha(&[&c, &c]);
        let expected = sha(&[&ab, &cc]);
        let hashes = [hash_leaf(&[1]), hash_leaf(&[2, 3]), hash_leaf(&[])];
        assert_eq!(root(&hashes).unwrap(), expected);
        // Known vector: SHA-256("abc").
        assert_eq!(
            to_hex(&hash_leaf(b"abc")),
            "0xba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (r, proof) = prove(&hashes, 2).unwrap();
        assert_eq!(r, expected);
        assert_eq!(
            proof,
            [
                ProofStep { hash: c, position: Position::Right },
                ProofStep { hash: ab, position: Position::Left }
            ]
        );
        // One leaf: the root is its hash and the proof is empty.
        assert_eq!(prove(&[a], 0).unwrap(), (a, vec![]));
    }

    #[test]
    fn tampered_proofs_fail() {
        let hashes = leaves(11);
        let (r, proof) = prove(&hashes, 6).unwrap();
        assert!(verify(&r, &hashes[6], &proof));
        for k in 0..proof.len() {
            let mut flipped = proof.clone();
            flipped[k].hash[0] ^= 1;
            assert!(!verify(&r, &hashes[6], &flipped), "hash of step {k}");
            let mut swapped = proof.clone();
            swapped[k].position = match swapped[k].position {
                Position::Left => Position::Right,
                Position::Right => Position::Left,
            };
            assert!(!verify(&r, &hashes[6], &swapped), "side of step {k}");
        }
        assert!(!verify(&r, &hashes[6], &proof[..proof.len() - 1]));
        let mut wrong_root = r;
        wrong_root[31] ^= 0x80;
        assert!(!verify(&wrong_root, &hashes[6], &proof));
    }

    fn step_from_json(v: &Value) -> ProofStep {
        let hash: Hash = from_hex(v["hash"].as_str().unwrap()).unwrap().try_into().unwrap();
        let position = serde_json::from_value(v["position"].clone()).unwrap();
        ProofStep { hash, position }
    }

    #[tokio::test]
    async fn the_handler_answers_a_verifiable_proof() {
        bounded(async {
            let raw: Vec<String> = (0..5u8).map(|i| format!("0x{:02x}{:02x}", i, i * 3)).collect();
            // Mixed prefixes and case.
            let mut given = raw.clone();
            given[1] = given[1].trim_start_matches("0x").to_owned();
            given[4] = given[4].to_uppercase().replacen("0X", "0x", 1);
            let payload = json!({"leaves": given, "leaf_index": 3}).to_string();
            let out = json(&MerkleProof.run(task("merkle_proof", payload)).await.unwrap());
            let hashes: Vec<Hash> = raw.iter().map(|l| hash_leaf(&from_hex(l).unwrap())).collect();
            let (r, proof) = prove(&hashes, 3).unwrap();
            assert_eq!(out["root"], to_hex(&r));
            assert_eq!(out["leaf"], to_hex(&hashes[3]));
            assert_eq!(out["leaf_index"], 3);
            let steps: Vec<ProofStep> = out["proof"].as_array().unwrap().iter().map(step_from_json).collect();
            assert_eq!(steps, proof);
            assert!(verify(&r, &hashes[3], &steps));
            assert_eq!(out["proof"][0]["position"], "left");
        })
        .await
    }

    #[tokio::test]
    async fn a_large_tree_runs_off_the_runtime() {
        bounded(async {
            let given: Vec<String> = (0..10_000u32).map(|i| to_hex(&i.to_le_bytes())).collect();
            let payload = json!({"leaves": given, "leaf_index": 4321}).to_string();
            assert!(payload.len() > 64 * 1024);
            let out = json(&MerkleProof.run(task("merkle_proof", payload)).await.unwrap());
            let steps: Vec<ProofStep> = out["proof"].as_array().unwrap().iter().map(step_from_json).collect();
            assert_eq!(steps.len(), 14);
            let r: Hash = from_hex(out["root"].as_str().unwrap()).unwrap().try_into().unwrap();
            assert!(verify(&r, &hash_leaf(&4321u32.to_le_bytes()), &steps));
        })
        .await
    }

    #[tokio::test]
    async fn bad_input_is_a_permanent_failure_naming_the_problem() {
        bounded(async {
            let cases = [
                ("not json".to_owned(), "invalid merkle_proof payload"),
                (r#"{"leaves":[],"leaf_index":0}"#.to_owned(), "no leaves"),
                (r#"{"leaf_index":0}"#.to_owned(), "missing field `leaves`"),
                (
                    r#"{"leaves":["0x01","0xzz"],"leaf_index":0}"#.to_owned(),
                    "leaves[1] (\"0xzz\") is not hex",
                ),
                (r#"{"leaves":["0x012"],"leaf_index":0}"#.to_owned(), "leaves[0] (\"0x012\") is not hex"),
                (
                    r#"{"leaves":["0x01","0x02"],"leaf_index":2}"#.to_owned(),
                    "leaf_index 2 is out of range for 2 leaves",
                ),
                (r#"{"leaves":["0x01"],"leaf_index":-1}"#.to_owned(), "invalid merkle_proof payload"),
                (
                    json!({"leaves": vec!["0x00"; MAX_LEAVES + 1], "leaf_index": 0}).to_string(),
                    "1000001 leaves; at most 1000000 per task",
                ),
            ];
            for (payload, wanted) in cases {
                let e = MerkleProof.run(task("merkle_proof", payload.clone())).await.unwrap_err();
                assert!(!e.retriable, "{payload:.80}");
                assert!(e.message.contains(wanted), "{payload:.80}: {}", e.message);
            }
        })
        .await
    }
}

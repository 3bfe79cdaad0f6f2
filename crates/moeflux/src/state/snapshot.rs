//! Saved sessions: a versioned little-endian file holding a session's
//! tokens, last logits, KV cache, recurrent state and checkpoints.
//!
//! A file is read completely and checked against the model's own state
//! layout before anything in the session is replaced: the model
//! fingerprint, the KV element type, every layer's dimensions and every
//! length. Lengths are checked against the bytes left before anything is
//! allocated, so a corrupt file cannot ask for more memory than its size.
//!
//! ```text
//! magic "MOEFLUXS" | version u32 | model fingerprint u64 | kv type u8 | layers u32
//! tokens: n u64, u32 × n | logits: n u64, f32 × n
//! kv: positions u64, then per layer: k_dim u32, v_dim u32, keys, values
//!     (positions × dim elements of the kv type each: f32 (type 0), f16
//!     (1), or for q8_0 (2) positions × ceil(dim / 32) f16 scales, then
//!     positions × dim i8 codes)
//! linear: per layer: present u8, then conv (n u64, f32 × n), state (n u64, f32 × n)
//! checkpoints: n u32, each: position u64, logits, linear (as above)
//! ```

use half::f16;

use super::kv::{Q8Rows, Rows};
use super::{Checkpoint, KvType, LinearState, SessionState};
use crate::tokenizer::TokenId;

const MAGIC: &[u8; 8] = b"MOEFLUXS";
/// Bumped whenever the layout changes; older files are refused by number.
pub const VERSION: u32 = 1;

/// A session's complete state, detached from the session.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Fingerprint of the model that produced it.
    pub model: u64,
    pub tokens: Vec<TokenId>,
    /// Logits after the last token (empty when unknown).
    pub logits: Vec<f32>,
    pub state: SessionState,
    pub checkpoints: Vec<Checkpoint>,
}

/// Why a saved session cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read or write the session file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a moeflux session file (bad magic)")]
    NotASession,
    #[error("session file version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("the session was saved from a different model (fingerprint {found:016x}, this model {expected:016x})")]
    OtherModel { expected: u64, found: u64 },
    #[error("the session file is truncated or corrupt: {0}")]
    Corrupt(String),
    #[error("the session does not fit this engine: {0}")]
    Mismatch(String),
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u64(out, v.len() as u64);
    out.reserve(4 * v.len());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_rows(out: &mut Vec<u8>, rows: &Rows) {
    match rows {
        Rows::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Rows::F16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Rows::Q8_0(r) => {
            r.d.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            out.extend(r.q.iter().map(|&q| q as u8));
        }
    }
}

fn put_linear(out: &mut Vec<u8>, linear: &[Option<LinearState>]) {
    for l in linear {
        match l {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                put_f32s(out, &s.conv);
                put_f32s(out, &s.recurrent);
            }
        }
    }
}

impl Snapshot {
    /// The file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let kv = &self.state.kv;
        let mut out = Vec::with_capacity(64 + self.state.bytes());
        out.extend_from_slice(MAGIC);
        put_u32(&mut out, VERSION);
        put_u64(&mut out, self.model);
        out.push(match self.state.kv.ty {
            KvType::F32 => 0,
            KvType::F16 => 1,
            KvType::Q8_0 => 2,
        });
        put_u32(&mut out, kv.layers.len() as u32);
        put_u64(&mut out, self.tokens.len() as u64);
        self.tokens
            .iter()
            .for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
        put_f32s(&mut out, &self.logits);
        put_u64(&mut out, kv.len as u64);
        for l in &kv.layers {
            // The header's type is the rows' (a cache is made of one type).
            debug_assert!(l.k.ty() == kv.ty && l.v.ty() == kv.ty);
            put_u32(&mut out, l.k_dim as u32);
            put_u32(&mut out, l.v_dim as u32);
            put_rows(&mut out, &l.k);
            put_rows(&mut out, &l.v);
        }
        put_linear(&mut out, &self.state.linear);
        put_u32(&mut out, self.checkpoints.len() as u32);
        for c in &self.checkpoints {
            put_u64(&mut out, c.pos as u64);
            put_f32s(&mut out, &c.logits);
            put_linear(&mut out, &c.linear);
        }
        out
    }

    /// Reads a file written by [`Snapshot::encode`], checking it against
    /// `template` (an empty state of the model it is for) and the model's
    /// fingerprint.
    pub fn decode(
        bytes: &[u8],
        fingerprint: u64,
        template: &SessionState,
    ) -> Result<Snapshot, SnapshotError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(8).ok() != Some(&MAGIC[..]) {
            return Err(SnapshotError::NotASession);
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        let model = r.u64()?;
        if model != fingerprint {
            return Err(SnapshotError::OtherModel {
                expected: fingerprint,
                found: model,
            });
        }
        let ty = match r.u8()? {
            0 => KvType::F32,
            1 => KvType::F16,
            2 => KvType::Q8_0,
            t => return Err(corrupt(format!("unknown KV element type {t}"))),
        };
        let want_ty = template.kv.ty;
        if ty != want_ty {
            return Err(SnapshotError::Mismatch(format!(
                "the session's KV cache is {}, this engine's is {} (open it with --kv-type {})",
                ty.name(),
                want_ty.name(),
                ty.name()
            )));
        }
        let n_layers = r.u32()? as usize;
        if n_layers != template.kv.layers.len() {
            return Err(corrupt(format!(
                "{n_layers} layers, the model has {}",
                template.kv.layers.len()
            )));
        }
        let n_tokens = r.len(4)?;
        let tokens = (0..n_tokens)
            .map(|_| r.u32())
            .collect::<Result<Vec<_>, _>>()?;
        let logits = r.f32s()?;
        let positions = r.u64()? as usize;
        if positions != n_tokens {
            return Err(corrupt(format!(
                "{positions} cached positions for {n_tokens} tokens"
            )));
        }
        if positions > template.kv.capacity {
            return Err(SnapshotError::Mismatch(format!(
                "{positions} tokens do not fit this engine's context of {} (raise --ctx-size)",
                template.kv.capacity
            )));
        }
        let mut state = template.clone();
        state.kv.len = positions;
        for (i, l) in state.kv.layers.iter_mut().enumerate() {
            let (k_dim, v_dim) = (r.u32()? as usize, r.u32()? as usize);
            if (k_dim, v_dim) != (l.k_dim, l.v_dim) {
                return Err(corrupt(format!(
                    "layer {i}: KV dimensions {k_dim}/{v_dim}, the model has {}/{}",
                    l.k_dim, l.v_dim
                )));
            }
            l.k = r.rows(ty, positions, k_dim)?;
            l.v = r.rows(ty, positions, v_dim)?;
        }
        state.linear = r.linear(&template.linear)?;
        let n_checkpoints = r.u32()? as usize;
        let mut checkpoints = Vec::new();
        for _ in 0..n_checkpoints {
            let pos = r.u64()? as usize;
            if pos > positions {
                return Err(corrupt(format!(
                    "a checkpoint at {pos}, past the {positions} tokens"
                )));
            }
            let logits = r.f32s()?;
            let linear = r.linear(&template.linear)?;
            checkpoints.push(Checkpoint {
                pos,
                linear,
                logits,
            });
        }
        if r.at != bytes.len() {
            return Err(corrupt(format!(
                "{} bytes after the end",
                bytes.len() - r.at
            )));
        }
        Ok(Snapshot {
            model,
            tokens,
            logits,
            state,
            checkpoints,
        })
    }
}

fn corrupt(message: String) -> SnapshotError {
    SnapshotError::Corrupt(message)
}

/// A bounds-checked cursor.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| corrupt(format!("ends early (at byte {})", self.at)))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// A count of `elem`-byte items, checked against the bytes left.
    fn len(&mut self, elem: usize) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) as u64;
        if n.checked_mul(elem as u64).is_none_or(|b| b > left) {
            return Err(corrupt(format!(
                "a list of {n} items at byte {} is longer than the file",
                self.at
            )));
        }
        Ok(n as usize)
    }

    fn f32s(&mut self) -> Result<Vec<f32>, SnapshotError> {
        let n = self.len(4)?;
        Ok(self
            .take(4 * n)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// `positions` rows of `dim` values in `ty`.
    fn rows(&mut self, ty: KvType, positions: usize, dim: usize) -> Result<Rows, SnapshotError> {
        let too_large = || corrupt("a KV layer is too large".into());
        let n = positions.checked_mul(dim).ok_or_else(too_large)?;
        let bytes = (positions as u64)
            .checked_mul(ty.row_bytes(dim as u64))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(too_large)?;
        let raw = self.take(bytes)?;
        let f16s = |raw: &[u8]| -> Vec<f16> {
            raw.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        Ok(match ty {
            KvType::F32 => Rows::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            KvType::F16 => Rows::F16(f16s(raw)),
            KvType::Q8_0 => {
                let (d, q) = raw.split_at(bytes - n);
                Rows::Q8_0(Q8Rows {
                    dim,
                    d: f16s(d),
                    q: q.iter().map(|&b| b as i8).collect(),
                })
            }
        })
    }

    fn linear(
        &mut self,
        template: &[Option<LinearState>],
    ) -> Result<Vec<Option<LinearState>>, SnapshotError> {
        template
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let present = self.u8()?;
                match (present, t) {
                    (0, None) => Ok(None),
                    (1, Some(t)) => {
                        let conv = self.f32s()?;
                        let recurrent = self.f32s()?;
                        if conv.len() != t.conv.len() || recurrent.len() != t.recurrent.len() {
                            return Err(corrupt(format!(
                                "layer {i}: recurrent state of {}+{} values, the model has {}+{}",
                                conv.len(),
                                recurrent.len(),
                                t.conv.len(),
                                t.recurrent.len()
                            )));
                        }
                        Ok(Some(LinearState { conv, recurrent }))
                    }
                    _ => Err(corrupt(format!(
                        "layer {i}: recurrent state {}, the model {}",
                        if present == 1 { "present" } else { "absent" },
                        if t.is_some() { "has one" } else { "has none" }
                    ))),
                }
            })
            .collect()
    }
}

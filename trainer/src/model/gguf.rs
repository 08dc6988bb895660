//! Reading GGUF files: header, metadata, tensor infos and block dequantisation to f32.
//! Follows the GGUF specification of llama.cpp (`docs/gguf.md`, `ggml/src/ggml-quants.c` for the
//! block layouts) and inverts the q/k row permutation of `convert_hf_to_gguf.py`
//! (`LlamaModel.permute`).
//!
//! Layout: little endian; magic `GGUF`, version (2 or 3), tensor count (u64), metadata count
//! (u64); metadata key/value pairs; tensor infos (name, dims with the fastest-varying first,
//! ggml type, offset into the data section); the data section starts at the next multiple of
//! `general.alignment` (default 32).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, for any integer type that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, for float and integer types.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // Shortest decimal of the f32 (1e-5, not 9.999999747378752e-6).
            MetaValue::F32(v) => Some(v.to_string().parse().unwrap_or(v.into())),
            MetaValue::F64(v) => Some(v),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Bf16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 2 + 16),
            GgmlType::Q4_1 => (32, 2 + 2 + 16),
            GgmlType::Q8_0 => (32, 2 + 32),
        }
    }
}

/// One tensor's entry in the tensor-info section.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (the reverse of the row-major shape).
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Row-major shape, as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    fn byte_len(&self) -> Result<usize> {
        let (per_block, bytes) = self.kind.block();
        let n = self.numel();
        ensure!(
            n.is_multiple_of(per_block),
            "tensor {}: {n} elements is not a multiple of the {:?} block of {per_block}",
            self.name,
            self.kind
        );
        Ok(n / per_block * bytes)
    }
}

/// A GGUF file, memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data_start: usize,
    map: memmap2::Mmap,
}

/// A little-endian cursor over the mapped bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("truncated at byte {} (wanted {n} more)", self.pos);
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = usize::try_from(self.u64()?)?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).context("string is not UTF-8")
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                ensure!(depth < 4, "metadata arrays nested too deeply");
                let elem = self.u32()?;
                let len = usize::try_from(self.u64()?)?;
                ensure!(
                    len <= self.bytes.len(),
                    "array length {len} exceeds the file"
                );
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(elem, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

impl GgufFile {
    /// Maps `path` and parses everything before the tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("map {}", path.display()))?;
        Self::parse(map, path).with_context(|| format!("read GGUF file {}", path.display()))
    }

    fn parse(map: memmap2::Mmap, path: &Path) -> Result<Self> {
        let mut r = Reader {
            bytes: &map,
            pos: 0,
        };
        ensure!(r.take(4)? == b"GGUF", "not a GGUF file (bad magic)");
        let version = r.u32()?;
        ensure!(
            version == 2 || version == 3,
            "GGUF version {version} (2 and 3 are read)"
        );
        let n_tensors = usize::try_from(r.u64()?)?;
        let n_kv = usize::try_from(r.u64()?)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string().with_context(|| format!("metadata key {i}"))?;
            let ty = r.u32()?;
            let value = r.value(ty, 0).with_context(|| format!("metadata {key}"))?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20));
        for i in 0..n_tensors {
            let name = r.string().with_context(|| format!("tensor info {i}"))?;
            let n_dims = r.u32()? as usize;
            ensure!(n_dims <= 4, "tensor {name}: {n_dims} dimensions");
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ty = r.u32()?;
            let kind = GgmlType::from_id(ty)
                .with_context(|| format!("tensor {name}: ggml type {ty} is not supported"))?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().context("general.alignment is not an integer")? as usize,
            None => 32,
        };
        ensure!(
            alignment.is_power_of_two(),
            "general.alignment {alignment} is not a power of two"
        );
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let out = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            map,
        };
        for t in &out.tensors {
            out.raw(t)?;
        }
        Ok(out)
    }

    /// A metadata value, or an error naming the key and the file.
    pub fn meta(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .with_context(|| format!("{}: metadata key {key} is missing", self.path.display()))
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("{}: tensor {name} is missing", self.path.display()))
    }

    fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        let start = self.data_start + usize::try_from(t.offset)?;
        let end = start + t.byte_len()?;
        ensure!(
            end <= self.map.len(),
            "tensor {}: data [{start}, {end}) runs past the end of the file ({} bytes)",
            t.name,
            self.map.len()
        );
        Ok(&self.map[start..end])
    }

    /// The tensor's values as f32, row-major in [`TensorInfo::shape`].
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let raw = self.raw(t)?;
        dequantize(t.kind, raw).with_context(|| format!("dequantise tensor {}", t.name))
    }
}

/// IEEE half to f32.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24.
            let v = m as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn half(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// Dequantises the raw bytes of one tensor of type `kind` (ggml-quants.c `dequantize_row_*`).
pub fn dequantize(kind: GgmlType, raw: &[u8]) -> Result<Vec<f32>> {
    let (per_block, bytes) = kind.block();
    ensure!(
        raw.len().is_multiple_of(bytes),
        "{} bytes is not a whole number of {kind:?} blocks",
        raw.len()
    );
    let mut out = Vec::with_capacity(raw.len() / bytes * per_block);
    for b in raw.chunks_exact(bytes) {
        match kind {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(half(b)),
            GgmlType::Bf16 => out.push(f32::from_bits(
                u32::from(u16::from_le_bytes([b[0], b[1]])) << 16,
            )),
            GgmlType::Q8_0 => {
                let d = half(&b[..2]);
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
            GgmlType::Q4_0 => {
                // Element j < 16 is the low nibble of byte j, element j + 16 its high nibble.
                let d = half(&b[..2]);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| (i32::from(q & 0x0f) - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (half(&b[..2]), half(&b[2..4]));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
    }
    Ok(out)
}

/// Inverts `LlamaModel.permute` of convert_hf_to_gguf.py on a [rows, cols] row-major weight:
/// GGUF row `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i` (head `h`, `i < hd/2`, `j < 2`),
/// i.e. HF = gguf.reshape(n_head, hd/2, 2, cols).swapaxes(1, 2).reshape(rows, cols).
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Result<Vec<f32>> {
    ensure!(
        w.len() == rows * cols,
        "weight has {} values, not {rows} x {cols}",
        w.len()
    );
    ensure!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "{rows} rows do not split into {n_head} heads of even size"
    );
    let hd = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * (hd / 2) + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn quantised_blocks() {
        // d = 0.5 (0x3800), m = -1.0 (0xbc00); byte k = k | (15 - k) << 4.
        let qs: Vec<u8> = (0..16u8).map(|k| k | ((15 - k) << 4)).collect();
        let mut q4_0 = vec![0x00, 0x38];
        q4_0.extend(&qs);
        let v = dequantize(GgmlType::Q4_0, &q4_0).unwrap();
        assert_eq!(v.len(), 32);
        assert_eq!(v[0], -4.0);
        assert_eq!(v[15], 3.5);
        assert_eq!(v[16], 3.5);
        assert_eq!(v[31], -4.0);
        let mut q4_1 = vec![0x00, 0x38, 0x00, 0xbc];
        q4_1.extend(&qs);
        let v = dequantize(GgmlType::Q4_1, &q4_1).unwrap();
        assert_eq!((v[0], v[15], v[16], v[31]), (-1.0, 6.5, 6.5, -1.0));
        let mut q8 = vec![0x00, 0x38];
        q8.extend((0..32).map(|k| (k as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &q8).unwrap();
        assert_eq!((v[0], v[16], v[31]), (-8.0, 0.0, 7.5));
        assert!(dequantize(GgmlType::Q8_0, &q8[..33]).is_err());
    }

    /// The inverse of the Python permutation, written out directly.
    #[test]
    fn unpermute_inverts_convert_permute() {
        let (n_head, hd, cols) = (3, 4, 2);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        // permute: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = (h * hd + j * hd / 2 + i) * cols;
                    let dst = (h * hd + i * 2 + j) * cols;
                    gguf[dst..dst + cols].copy_from_slice(&hf[src..src + cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, rows, cols, n_head).unwrap(), hf);
    }

    /// A small file written by hand: header, metadata of several types, two tensors, alignment.
    #[test]
    fn parses_a_written_file() {
        let mut f = Vec::new();
        let s = |f: &mut Vec<u8>, x: &str| {
            f.extend((x.len() as u64).to_le_bytes());
            f.extend(x.as_bytes());
        };
        f.extend(b"GGUF");
        f.extend(3u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        s(&mut f, "general.architecture");
        f.extend(8u32.to_le_bytes());
        s(&mut f, "llama");
        s(&mut f, "llama.block_count");
        f.extend(4u32.to_le_bytes());
        f.extend(30u32.to_le_bytes());
        s(&mut f, "tokenizer.ggml.tokens");
        f.extend(9u32.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        s(&mut f, "a");
        s(&mut f, "Ġb");
        s(&mut f, "w");
        f.extend(2u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        f.extend(0u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        s(&mut f, "q");
        f.extend(1u32.to_le_bytes());
        f.extend(32u64.to_le_bytes());
        f.extend(8u32.to_le_bytes());
        f.extend(32u64.to_le_bytes());
        while f.len() % 32 != 0 {
            f.push(0);
        }
        for k in 0..6 {
            f.extend((k as f32).to_le_bytes());
        }
        f.extend([0u8; 8]);
        f.extend([0x00, 0x3c]);
        f.extend((0..32).map(|k| k as u8));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, &f).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(
            g.meta("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(g.meta("llama.block_count").unwrap().as_u64(), Some(30));
        let toks = g.meta("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!(toks[1].as_str(), Some("Ġb"));
        let w = g.tensor("w").unwrap();
        assert_eq!(w.shape(), vec![3, 2]);
        assert_eq!(g.dequantize(w).unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let q = g.dequantize(g.tensor("q").unwrap()).unwrap();
        assert_eq!(q[31], 31.0);
        std::fs::write(&path, &f[..f.len() - 1]).unwrap();
        let err = format!("{:#}", GgufFile::open(&path).err().unwrap());
        assert!(err.contains("tensor q") && err.contains("t.gguf"), "{err}");
    }
}

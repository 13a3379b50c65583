//! The GGUF header (metadata and tensor table) read from the file's mapped bytes, every length and count
//! checked against the bytes that remain, so that a corrupt or hostile file gives an error, never a panic,
//! an out-of-bounds read or an allocation larger than the file warrants. Into candle's `Content`, which the
//! rest of the loader reads. (candle's own reader panics on `general.alignment: 0`, a division by zero; test
//! `gguf_errors::a_zero_alignment_is_an_error`.)

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;

/// Arrays nest at most this deep (real files nest none).
const MAX_DEPTH: usize = 8;
/// Dimensions of one tensor (ggml's limit).
const MAX_DIMS: u32 = 4;
pub const DEFAULT_ALIGNMENT: u64 = 32;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = self.bytes.len() - self.pos;
        if n > left as u64 {
            return Err(format!("{what} needs {n} bytes at offset {} but {left} remain", self.pos));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N as u64, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let b = self.take(len, what)?;
        // Strings should not be NUL-terminated, but some writers do it.
        let end = b.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
        Ok(String::from_utf8_lossy(&b[..end]).into_owned())
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b}")),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte (an empty nested array or string: 12 or 8): a count
                // the rest of the file cannot hold is refused before anything is allocated for it.
                let least = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("{what}: unknown array element type {t}")),
                };
                if count.saturating_mul(least) > self.remaining() {
                    return Err(format!(
                        "{what}: an array of {count} elements cannot fit the {} bytes left",
                        self.remaining()
                    ));
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// ggml's type ids for the tensor types candle reads.
fn dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Reads the header of a GGUF v2/v3 file (whose first four bytes, the magic, the caller checked).
pub fn read(bytes: &[u8]) -> Result<Content, String> {
    let mut r = Reader { bytes, pos: 4 };
    let magic = match r.u32("version")? {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(format!("GGUF version {v} is not supported (2 or 3)")),
    };
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;
    // A metadata entry takes at least 13 bytes (key length, type, a one-byte value), a tensor 24.
    if kv_count.saturating_mul(13).saturating_add(tensor_count.saturating_mul(24)) > r.remaining() {
        return Err(format!(
            "{kv_count} metadata entries and {tensor_count} tensors cannot fit the file's {} bytes",
            bytes.len()
        ));
    }
    let mut metadata = HashMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key {i}"))?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, 0, &key)?;
        metadata.insert(key, v);
    }
    let mut tensor_infos = HashMap::new();
    for i in 0..tensor_count {
        let name = r.string(&format!("tensor name {i}"))?;
        let n = r.u32(&name)?;
        if n > MAX_DIMS {
            return Err(format!("tensor `{name}`: {n} dimensions (at most {MAX_DIMS})"));
        }
        let mut dims = (0..n).map(|_| r.u64(&name).map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
        dims.reverse();
        let id = r.u32(&name)?;
        let ggml_dtype = dtype(id).ok_or_else(|| format!("tensor `{name}`: unknown type {id}"))?;
        let offset = r.u64(&name)?;
        if tensor_infos.insert(name.clone(), TensorInfo { ggml_dtype, shape: dims.into(), offset }).is_some() {
            return Err(format!("tensor `{name}` is listed twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match crate::gguf::value_to_u64(v) {
            Some(a) if a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };
    let tensor_data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    Ok(Content { magic, metadata, tensor_infos, tensor_data_offset })
}

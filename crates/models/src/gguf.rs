//! A GGUF file opened for reading: metadata, tensor directory, and tensor loading with errors that name
//! the file and the tensor.

use crate::error::{Error, Result};
use crate::source::TensorData;
use candle_core::quantized::gguf_file::{Content, Value};
use mlx_serving_kernels::mapped::MappedFile;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// The whole file, mapped: tensors are slices of it.
    map: MappedFile,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).finish_non_exhaustive()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io { path: path.clone(), source };
        let map = MappedFile::open(&path).map_err(io)?;
        let bytes = map.bytes();
        let Some(magic) = bytes.get(..4) else {
            return Err(Error::NotGguf { path, reason: "file is shorter than the 4-byte magic".into() });
        };
        if magic != b"GGUF" {
            return Err(Error::NotGguf { path, reason: format!("wrong magic {magic:02x?} (expected \"GGUF\")") });
        }
        let content = crate::gguf_header::read(bytes).map_err(|reason| Error::BadGguf {
            path: path.clone(),
            reason: format!("header: {reason} (truncated or corrupt file?)"),
        })?;
        let gguf = Self { path, content, map };
        gguf.check_tensor_extents()?;
        Ok(gguf)
    }

    /// Every tensor must lie inside the file: a truncated download fails here, at open, naming the tensor.
    fn check_tensor_extents(&self) -> Result<()> {
        let len = self.map.bytes().len() as u64;
        for (name, info) in &self.content.tensor_infos {
            let Some(elems) = info.shape.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
                return Err(self.bad_tensor(name, format!("shape {:?} has too many elements", info.shape.dims())));
            };
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(self.bad_tensor(
                    name,
                    format!("{elems} elements is not a multiple of the {:?} block size {bs}", info.ggml_dtype),
                ));
            }
            let bytes = ((elems / bs) as u64).saturating_mul(info.ggml_dtype.type_size() as u64);
            let end = self.content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
            if end > len {
                return Err(self.bad_tensor(
                    name,
                    format!("data ends at byte {end} but the file has {len} bytes (truncated file?)"),
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bad_tensor(&self, name: &str, reason: impl Into<String>) -> Error {
        Error::BadTensor { path: self.path.clone(), name: name.to_string(), reason: reason.into() }
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.metadata(key).ok_or_else(|| Error::MissingMetadata { path: self.path.clone(), key: key.into() })
    }

    fn bad_meta(&self, key: &str, reason: impl std::fmt::Display) -> Error {
        Error::BadMetadata { path: self.path.clone(), key: key.into(), reason: reason.to_string() }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        value_to_u64(v).ok_or_else(|| self.bad_meta(key, format!("expected an integer, got {v:?}")))
    }

    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>> {
        if self.metadata(key).is_none() {
            return Ok(None);
        }
        self.get_u64(key).map(Some)
    }

    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(self.bad_meta(key, format!("expected a float, got {v:?}"))),
        }
    }

    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad_meta(key, format!("expected a bool, got {v:?}"))),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.bad_meta(key, format!("expected a string, got {:?}", v.value_type()))),
        }
    }

    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        if self.metadata(key).is_none() {
            return Ok(None);
        }
        self.get_str(key).map(Some)
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.require(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    other => Err(self.bad_meta(key, format!("expected strings, found {:?}", other.value_type()))),
                })
                .collect(),
            v => Err(self.bad_meta(key, format!("expected an array, got {:?}", v.value_type()))),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        match self.require(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    other => Err(self.bad_meta(key, format!("expected floats, found {:?}", other.value_type()))),
                })
                .collect(),
            v => Err(self.bad_meta(key, format!("expected an array, got {:?}", v.value_type()))),
        }
    }

    pub fn get_int_array_opt(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    value_to_u64(v)
                        .map(|x| x as i64)
                        .or_else(|| value_to_i64(v))
                        .ok_or_else(|| self.bad_meta(key, "expected integers"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad_meta(key, format!("expected an array, got {:?}", v.value_type()))),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Every tensor's name, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims().to_vec())
    }

    /// A tensor's bytes in the mapped file, checking its shape (in candle's order: rows first, e.g. `[out, in]`
    /// for a weight). `open` checked that every tensor lies inside the file.
    pub fn tensor_data(&self, name: &str, shape: &[usize]) -> Result<TensorData<'_>> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(Error::MissingTensor { path: self.path.clone(), name: name.into() });
        };
        if info.shape.dims() != shape {
            return Err(self.bad_tensor(name, format!("shape {:?}, expected {shape:?}", info.shape.dims())));
        }
        let t = info.ggml_dtype;
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let len = info.shape.elem_count() / t.block_size() * t.type_size();
        Ok(TensorData {
            dtype: t,
            shape: shape.to_vec(),
            bytes: Cow::Borrowed(&self.map.bytes()[start..start + len]),
            mins: None,
        })
    }
}

pub(crate) fn value_to_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn value_to_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x as i64),
        Value::I16(x) => Some(x as i64),
        Value::I32(x) => Some(x as i64),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

//! The operational layers between the HTTP front ends and the engines (DESIGN.md §2): so far the model
//! registry, which loads models on demand and unloads them by memory budget, model count and idle time
//! (the server's loader and endpoints are in `mlx_serving_server::models` and `admin`).

pub mod registry;

pub use registry::{Counts, Lease, Limits, Loader, ModelInfo, ModelSpec, Registry, RegistryError, State};

#[cfg(test)]
mod tests;

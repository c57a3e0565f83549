//! What `cargo xtask` does that tests also use: rendering the chart (`manifests`) and the
//! agent crate's module graph (`layers`).

pub mod layers;
pub mod manifests;

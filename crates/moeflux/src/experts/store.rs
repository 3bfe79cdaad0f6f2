//! The expert store: where a layer's routed experts come from.
//!
//! The model asks the store for expert `e` of layer `l` and computes with
//! what it gets; it never reads files itself.

use crate::backend::cpu::Matrix;
use crate::format::ModelFiles;
use crate::model::weights::WeightRef;

/// Where one expert's three matrices are.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertRef {
    /// `[ff, hidden]`
    pub gate: WeightRef,
    /// `[ff, hidden]`
    pub up: WeightRef,
    /// `[hidden, ff]`
    pub down: WeightRef,
}

/// One expert's weights, ready to compute with.
pub struct ExpertView<'a> {
    pub gate: Matrix<'a>,
    pub up: Matrix<'a>,
    pub down: Matrix<'a>,
}

/// The routed experts of every layer.
#[derive(Debug, Default)]
pub struct ExpertStore {
    /// `layers[l][e]`; empty for layers without routed experts.
    layers: Vec<Vec<ExpertRef>>,
}

impl ExpertStore {
    pub fn new(layers: Vec<Vec<ExpertRef>>) -> ExpertStore {
        ExpertStore { layers }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn experts(&self, layer: usize) -> &[ExpertRef] {
        &self.layers[layer]
    }

    /// Expert `e` of layer `layer`.
    pub fn view<'a>(&mut self, files: &'a ModelFiles, layer: usize, e: usize) -> ExpertView<'a> {
        let r = &self.layers[layer][e];
        ExpertView {
            gate: r.gate.view(files),
            up: r.up.view(files),
            down: r.down.view(files),
        }
    }
}

"""Data-dependent merging: methods that need the fine-tuned models' activations on task inputs.

* The methods (``DataMergeMethod`` subclasses, each with its ``spec``): Fisher (exact per-example), ``fisher_batch``
  (FusionBench's estimator), RegMean, AdaMerging / AdaMerging++ (transductive: unlabelled test inputs) and Consensus
  with per-task TALL masks (``tall_consensus``: λ_t chosen on labelled validation data). ``mergelab.merge`` runs them
  through ``api.merge_with_data``: one merged encoder state dict in base layout.
* ``api.tall_masks_with_data``: one reconstructed encoder per task (TALL masks; not a single merged model).
* ``api.neulig_with_data``: the NeuLig router, with ensembling vs merging accuracy per task (``NeuLigOptions``).

The shared contract is in ``base``, loading models with their data in ``experts``; the registry of every method
(weight-space and data-dependent) is ``mergelab.api.registry``.
"""

"""Data-dependent merging: methods that need the fine-tuned models' activations on task inputs.

* ``api.merge_with_data``: Fisher (exact per-example), ``fisher_batch`` (FusionBench's estimator), RegMean,
  AdaMerging / AdaMerging++ (transductive: unlabelled test inputs) and Consensus with per-task TALL masks
  (``tall_consensus``: λ_t chosen on labelled validation data); one merged encoder state dict in base layout.
* ``api.tall_masks_with_data``: one reconstructed encoder per task (TALL masks; not a single merged model).
* ``api.neulig_with_data``: the NeuLig router, with ensembling vs merging accuracy per task.

The method list and parameter validation live in ``registry``; the shared contract in ``base``.
"""

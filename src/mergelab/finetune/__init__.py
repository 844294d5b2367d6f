"""Fine-tuning task experts: the recipe (``finetune.config.FinetuneConfig``, the one declaration of every
hyper-parameter), training and the content-keyed cache (``finetune.experts``), the frozen-encoder probe
(``finetune.probe``) and the multi-task-learning baseline."""

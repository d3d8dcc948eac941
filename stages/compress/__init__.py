"""The paper's method as pure code: no params.yaml, no paths, no ultralytics.

- ``sparsity``: the L1 penalty on BatchNorm scales and its schedule (sparsity-aware training);
- ``pruning``: structured channel pruning by |gamma| (trace, plan, surgery, budgets);
- ``cwd``: Channel-Wise Knowledge Distillation (the loss and the student-to-teacher aligners);
- ``quantize``: the INT8 Q/DQ recipe and TensorRT's rules for explicit quantization.
"""

"""The testbed model: synthetic data (data.py), training (train.py), validation (validate.py)
and the training-filter demonstration (finetune_filters.py); raw results in results/.

The trained weights and model card are product data: ``attnmem/data/testbed/``.
"""

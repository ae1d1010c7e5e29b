"""Integrations with training frameworks.

lm            causal-LM unlearning losses (GA, NPO; NLL, KL) normalised over an accumulation window
loop          a plain two-player training-loop step (no framework needed)
transformers  MUNBaTrainer, a Hugging Face Trainer that bargains (optional extra [hf])
"""

"""Backdoor attacks on the projector: triggers, target behaviours, the named variants, poisoning, fine-tuning."""

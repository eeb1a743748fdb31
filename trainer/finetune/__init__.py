"""Fine-tuning: the strategies (full, frozen, BitFit, peft, gradual unfreezing, distillation) and bottleneck adapters."""

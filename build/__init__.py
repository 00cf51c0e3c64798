"""headrace build pipeline: fine-tune, distill, export, quantize, engine build, model cards."""

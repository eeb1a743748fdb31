"""The Hugging Face Hub: reachability checks and pushing the output directory."""

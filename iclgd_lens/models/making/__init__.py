"""How the embedded models were made: their tokenizer, their training run (next-token or ICL
objective on the synthetic corpus of `iclgd_lens.tasks.mapping`) and their k-shot evaluation."""

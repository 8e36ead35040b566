"""Toy worlds whose answer is known, used by studies: von Oswald et al.'s linear self-attention
that does one GD step by construction (oswald), and Chan et al.'s synthetic in-context vs
in-weight learning generator and gated model (chan)."""

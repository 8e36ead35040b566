"""iclgd-lens: test, layer by layer, whether in-context learning in LLaMA models behaves like
gradient descent. Hook points on a TransformerLens `TransformerBridge` record attention-layer
updates during ICL and compare them with the implicit weight updates of GD."""

__version__ = "0.1.0"

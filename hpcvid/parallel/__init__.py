"""How models are spread over ranks, applied from outside the models: data parallelism and FSDP2 sharding for
training (fsdp.py); clip parallelism for rendering comes with the render stage."""

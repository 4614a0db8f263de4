"""Router analytics: routing statistics (``statistics``, also used for the training logs) and the
``llamafactory-moe analyze`` command (``analyze``)."""

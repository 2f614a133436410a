"""Imported first by ``fairtune.models``: import-time notices that say nothing to a user."""

import logging


class NoTorchvisionFallbackNotice(logging.Filter):
    """torchvision is not a dependency: transformers' PIL image processors are the ones we want, so its
    "requires torchvision; falling back" notice on every import says nothing to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(NoTorchvisionFallbackNotice())

"""The base of every settings model."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

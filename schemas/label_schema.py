"""The labelling form's schema (schemas/label_schema.yaml), validated by pydantic."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.config import ConfigError, describe_validation_error

DEFAULT_LABEL_SCHEMA = Path(str(resources.files("schemas").joinpath("label_schema.yaml")))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnswerOption(Strict):
    code: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    display: str


class LabelItem(Strict):
    """One question a reader answers per study."""

    link_id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    text: str
    type: Literal["choice", "text", "string", "integer", "decimal", "boolean"]
    required: bool = False
    answers: tuple[AnswerOption, ...] = ()

    @model_validator(mode="after")
    def _choices_have_answers(self) -> LabelItem:
        if (self.type == "choice") != bool(self.answers):
            raise ValueError("a choice item lists its answers, and only a choice item does")
        return self


class Prefill(Strict):
    study: tuple[str, ...] = ()
    patient: tuple[str, ...] = ()
    clinical: tuple[str, ...] = ()


class LabelSchema(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9.-]{1,64}$")  # a FHIR id
    url: str
    version: str
    title: str
    answer_system: str
    prefill: Prefill = Prefill()
    reader_item: str = "reader"
    role_item: str = "role"
    roles: tuple[str, ...] = ("reader", "adjudicator")
    adjudicator_role: str = "adjudicator"
    items: tuple[LabelItem, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> LabelSchema:
        ids = [i.link_id for i in self.items] + [self.reader_item, self.role_item]
        if len(set(ids)) != len(ids):
            raise ValueError("link ids (items, reader_item, role_item) must be unique")
        if self.adjudicator_role not in self.roles:
            raise ValueError("adjudicator_role must be one of roles")
        return self

    def item(self, link_id: str) -> LabelItem | None:
        return next((i for i in self.items if i.link_id == link_id), None)


def load_label_schema(path: Path = DEFAULT_LABEL_SCHEMA) -> LabelSchema:
    """Read and validate a label schema; a problem is one line naming the key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return LabelSchema.model_validate(raw)
    except OSError as err:
        raise ConfigError(f"cannot read label schema {path}: {err.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(f"label schema {path} is not valid YAML") from None
    except ValidationError as err:
        raise ConfigError(f"label schema: {describe_validation_error(err)}") from None

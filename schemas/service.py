"""Wire models of the small service endpoints: the op catalogue and the probes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class OpInfo(BaseModel):
    name: str
    arity: int = Field(description="number of inputs (0 for leaves)")
    attrs: dict[str, str] = Field(description="attribute name -> meaning and default")
    meaning: str
    role: str = Field(description="how the op routes gradient (CS231n's gate words)")


class OpsResponse(BaseModel):
    ops: list[OpInfo]


class ProbeResponse(BaseModel):
    status: str

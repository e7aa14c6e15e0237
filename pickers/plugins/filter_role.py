"""Keep pods allowed to play ``role`` (llm-d.ai/role: prefill, decode, both)."""

from pickers.framework import Filter, Param, register


@register
class RoleFilter(Filter):
    TYPE = "role"
    reads_metrics = False
    PARAMS = {"role": Param(str, "decode", choices=("decode", "prefill"))}
    role: str

    def filter(self, ctx, cands):
        ok = self.dl.endpoints.can_decode if self.role == "decode" else self.dl.endpoints.can_prefill
        keep = cands[ok[cands]]
        ctx.rejected[f"role={self.role}"] = ctx.rejected.get(f"role={self.role}", 0) + cands.size - keep.size
        return keep

    @property
    def label(self) -> str:
        return f"role-{self.role}"

"""The precision modes of DESIGN.md's mode table, one class each.

Origin dtype = the dtype the op has in the unmodified model; low = float16, or
bfloat16 for the bf16 variants. Float64 ops keep their precision in every mode.
"""

from __future__ import annotations

from precision_policy.modes.base import BF16, F16, F32, F64, Decision, NoKernel, PrecisionMode, choose
from precision_policy.opinfo.library import BLACK, WHITE, OpInfo
from precision_policy.rules import Rule, Why


def _keep_f64(info: OpInfo, origin: str) -> Decision:
    return choose(info, (F64, F32), Why(Rule.FLOAT64), origin)


class ForceFP32(PrecisionMode):
    """Every op that has a float32 kernel runs in float32; others fall back to a low kernel."""

    name = "force_fp32"
    aliases = ("cube_fp16in_fp32out",)
    description = "float32 wherever a float32 kernel exists; ops without one (Conv2D on ascend910) run low with casts around them"

    def decide(self, info: OpInfo, flag: str, origin: str, follow: str | None) -> Decision:
        if origin == F64:
            return _keep_f64(info, origin)
        return choose(info, (F32, F16, BF16), Why(Rule.MODE, detail=self.name), origin)


class MustKeepOriginDtype(PrecisionMode):
    """Every op keeps its origin dtype; an op without a kernel for it is an error."""

    name = "must_keep_origin_dtype"
    aliases = ("origin",)
    description = "every op keeps its origin dtype; an op with no kernel for it is an error"

    def decide(self, info: OpInfo, flag: str, origin: str, follow: str | None) -> Decision:
        if info.supports(origin):
            return Decision(origin, Why(Rule.MODE, detail=self.name))
        raise NoKernel(f"no {origin} kernel; the library supports {info.describe_dtypes()}")


class AllowFP32ToLow(PrecisionMode):
    """Keep float32 where a kernel exists; lower only what has no float32 kernel (and cube ops to fp16)."""

    cube_to_low = False

    def decide(self, info: OpInfo, flag: str, origin: str, follow: str | None) -> Decision:
        if origin == F64:
            return _keep_f64(info, origin)
        if origin == F32:
            if self.cube_to_low and info.heavy and info.supports(self.low):
                return Decision(self.low, Why(Rule.MODE, detail="cube_op"))
            return choose(info, (F32, self.low), Why(Rule.MODE, detail="vector_op" if self.cube_to_low else "keeps_float32"),
                          origin)
        return choose(info, (origin, F32, self.low), Why(Rule.MODE, detail="keeps_origin"), origin)


class AllowFP32ToFP16(AllowFP32ToLow):
    name = "allow_fp32_to_fp16"
    aliases = ("default",)
    low = F16
    cube_to_low = True
    description = "cube ops (conv, matmul) run in float16; vector ops keep float32; ops without a float32 kernel run in float16"


class AllowFP32ToBF16(AllowFP32ToLow):
    name = "allow_fp32_to_bf16"
    low = BF16
    description = "float32 wherever a float32 kernel exists, else bfloat16"


class ForceLow(PrecisionMode):
    """Every op with a low kernel runs low; an op without one stays float32."""

    def decide(self, info: OpInfo, flag: str, origin: str, follow: str | None) -> Decision:
        if origin == F64:
            return _keep_f64(info, origin)
        return choose(info, (self.low, F32), Why(Rule.MODE, detail=self.name), origin)


class ForceFP16(ForceLow):
    name = "force_fp16"
    aliases = ("fp16",)
    low = F16
    description = "float16 wherever a float16 kernel exists; float32-only ops stay float32"


class ForceBF16(ForceLow):
    name = "force_bf16"
    aliases = ("bf16",)
    low = BF16
    description = "bfloat16 wherever a bfloat16 kernel exists; others stay float32"


class AllowMixPrecision(PrecisionMode):
    """White ops run low, black ops keep their origin dtype, gray ops follow their producers.

    Graph inputs vote like computing ops (an activation stream keeps its precision, as
    type promotion does in torch.autocast); constants and variables don't (they are cast,
    not followed). A gray op fed only by constants and variables is decided as
    allow_fp32_to_<low> would decide it.
    """

    mixed = True

    def _base(self, info: OpInfo, origin: str) -> Decision:
        if origin == F32:
            if self.low == F16 and info.heavy and info.supports(F16):
                return Decision(F16, Why(Rule.MODE, detail="cube_op"))
            return choose(info, (F32, self.low), Why(Rule.MODE, detail="keeps_float32"), origin)
        return choose(info, (origin, F32, self.low), Why(Rule.MODE, detail="keeps_origin"), origin)

    def decide(self, info: OpInfo, flag: str, origin: str, follow: str | None) -> Decision:
        if origin == F64:
            return _keep_f64(info, origin)
        low = self.low
        if flag == WHITE:
            d, why, warn = choose(info, (low, origin, F32), Why(Rule.WHITE), origin)
            if d != low:
                warn = warn or f"{info.op_type} is white-listed but the library has no {low} kernel; runs in {d}"
                return Decision(d, Why(Rule.WHITE, inner=why), warn)
            return Decision(d, why, warn)
        if flag == BLACK:
            if info.supports(origin):
                return Decision(origin, Why(Rule.BLACK))
            raise NoKernel(f"black-listed op has no {origin} kernel (supports: {info.describe_dtypes()})")
        if follow is not None:
            if info.supports(follow):
                return Decision(follow, Why(Rule.GRAY_FOLLOWS))
            d, why, _ = choose(info, (origin, F32, low), Why(Rule.MODE, detail="keeps_origin"), origin)
            return Decision(d, Why(Rule.FALLBACK_KERNEL, wanted=(follow,), inner=why))
        d, why, warn = self._base(info, origin)
        return Decision(d, Why(Rule.GRAY_UNFED, inner=why), warn)


class AllowMixPrecisionFP16(AllowMixPrecision):
    name = "allow_mix_precision"
    aliases = ("allow_mix_precision_fp16", "mixed_float16")
    low = F16
    description = "white ops float16, black ops keep their dtype, gray ops follow their producer"


class AllowMixPrecisionBF16(AllowMixPrecision):
    name = "allow_mix_precision_bf16"
    aliases = ("mixed_bfloat16",)
    low = BF16
    description = "white ops bfloat16, black ops keep their dtype, gray ops follow their producer"


ALL_MODES: tuple[type[PrecisionMode], ...] = (
    ForceFP32,
    MustKeepOriginDtype,
    AllowFP32ToFP16,
    ForceFP16,
    AllowMixPrecisionFP16,
    AllowFP32ToBF16,
    AllowMixPrecisionBF16,
    ForceBF16,
)

"""Generic, serializable feature steps; a domain's feature pipeline is a configured list of them.

    base      Step and its self-description (StepInfo), the Columns view, the step registry, helpers
    dates     DateParts, MonthsSince, WeeksSince, MonthInList
    joins     JoinTable (stored tables), GroupAny (per-group flags learned in fit)
    events    ElapsedEvents (per-group days since/until events, window counts, from a calendar)
    calendar  event calendar tables: build, lay over, check, read from a file, index
    pipeline  FeaturePipeline: fit/transform, save/load, self-description
"""

from modeling.features.base import (
    STEP_REGISTRY,
    Columns,
    Step,
    StepInfo,
    add_columns,
    as_datetime,
    canonical_table,
    decode_table,
    encode_table,
    numbers,
    register,
    require,
    step_from_dict,
    truthy,
)
from modeling.features.calendar import (
    CalendarIndex,
    calendar_problems,
    calendar_table,
    read_calendar_file,
)
from modeling.features.dates import (
    CALENDAR_ATTRS,
    DATE_ATTRS,
    MONTH_NAMES,
    DateParts,
    MonthInList,
    MonthsSince,
    WeeksSince,
    iso_week_monday,
    year_month,
)
from modeling.features.events import ElapsedEvents
from modeling.features.joins import GroupAny, JoinTable
from modeling.features.pipeline import FORMAT, FORMAT_VERSION, FeaturePipeline

__all__ = [
    "CALENDAR_ATTRS", "DATE_ATTRS", "CalendarIndex", "calendar_problems", "calendar_table",
    "read_calendar_file", "FORMAT", "FORMAT_VERSION", "MONTH_NAMES", "STEP_REGISTRY",
    "Columns", "DateParts", "ElapsedEvents", "FeaturePipeline", "GroupAny", "JoinTable",
    "MonthInList", "MonthsSince", "Step", "StepInfo", "WeeksSince", "add_columns", "as_datetime",
    "canonical_table", "decode_table", "encode_table", "iso_week_monday", "numbers", "register",
    "require", "step_from_dict", "truthy", "year_month",
]

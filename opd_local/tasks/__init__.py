"""The row formats a data source can hold, one module each: a new dataset is one new file here,
listed in TASKS and in the choices of `DataConfig.format`.

A task module names itself (`NAME`), the columns that identify it (`COLUMNS`), the fields it reads
(`FIELDS`), and turns one record into a `PrivilegedRow` (`to_row(record, row_id)`).
"""

from opd_local.tasks import gsm8k, messages

# In the order a source's columns are matched against them.
TASKS = {task.NAME: task for task in (gsm8k, messages)}

"""Evaluation-harness integrations: lmms-eval (`illava.integrations.lmms_eval`) and VLMEvalKit
(`illava.integrations.vlmeval`).

Neither harness is a dependency of illava: each module imports its harness only when used and names the
package to install when it is missing. `illava.report.merge_reports` (harness-neutral) turns the last forward's trace
into per-sample token counts per stage, which both integrations log.
"""

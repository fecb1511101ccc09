// Small SVG charts for a canary analysis: the old release beside the new one.
import { s } from "./dom.js";

const WIDTH = 220;
const BAR = 14;

function finite(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

// Two bars, old and new, on one scale; the threshold (if any) as a line, its value in the corner.
export function pair(label, old, young, format, threshold = null) {
  const values = [finite(old), finite(young), finite(threshold)].filter((v) => v !== null);
  const top = Math.max(...values, 0) || 1;
  const scale = (v) => Math.max(1, Math.round(((WIDTH - 90) * v) / top));
  const row = (y, name, value, cls) => [
    s("text", { x: 0, y: y + BAR - 3, class: "chart-label" }, name),
    value === null
      ? s("text", { x: 40, y: y + BAR - 3, class: "chart-value" }, "no data")
      : [
          s("rect", { x: 40, y, width: scale(value), height: BAR, class: cls }),
          s("text", { x: 44 + scale(value), y: y + BAR - 3, class: "chart-value" }, format(value)),
        ],
  ];
  const limit = finite(threshold);
  return s(
    "svg",
    { class: "chart", width: WIDTH, height: 2 * BAR + 22, viewBox: `0 0 ${WIDTH} ${2 * BAR + 22}`, role: "img" },
    s("title", {}, label),
    s("text", { x: 0, y: 10, class: "chart-title" }, label),
    limit === null
      ? null
      : s("text", { x: WIDTH, y: 10, class: "chart-value threshold-value", "text-anchor": "end" }, `limit ${format(limit)}`),
    row(14, "old", finite(old), "bar-old"),
    row(16 + BAR, "new", finite(young), "bar-new"),
    limit === null
      ? null
      : s("line", {
          x1: 40 + scale(limit),
          x2: 40 + scale(limit),
          y1: 12,
          y2: 18 + 2 * BAR,
          class: "threshold",
          "data-value": limit,
        }),
  );
}

// A metric over the analysis window, old and new as two lines.
export function series(label, points, metric, format) {
  const olds = points.map((p) => finite(p?.old?.[metric]));
  const news = points.map((p) => finite(p?.new?.[metric]));
  const values = [...olds, ...news].filter((v) => v !== null);
  if (points.length < 2 || !values.length) return null;
  const top = Math.max(...values) || 1;
  const height = 40;
  const x = (i) => Math.round((i * (WIDTH - 10)) / (points.length - 1));
  const y = (v) => Math.round(14 + height - (height * v) / top);
  const line = (vals, cls) =>
    s("polyline", {
      class: cls,
      points: vals
        .map((v, i) => (v === null ? null : `${x(i)},${y(v)}`))
        .filter(Boolean)
        .join(" "),
    });
  return s(
    "svg",
    { class: "chart", width: WIDTH, height: height + 18, viewBox: `0 0 ${WIDTH} ${height + 18}`, role: "img" },
    s("title", {}, label),
    s("text", { x: 0, y: 10, class: "chart-title" }, label),
    s("text", { x: WIDTH, y: 10, class: "chart-value", "text-anchor": "end" }, `max ${format(top)}`),
    line(olds, "line-old"),
    line(news, "line-new"),
  );
}

export const percent = (v) => `${(100 * v).toFixed(v < 0.1 ? 2 : 1)} %`;
export const seconds = (v) => (v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(2)} s`);

// Building the page's DOM. Every value from the fleet (names, commit subjects,
// hold reasons, outcomes) becomes a text node or an attribute value through
// these helpers: never markup. Nothing here touches innerHTML.

const SVG = "http://www.w3.org/2000/svg";

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setAttributes(node, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  return node;
}

// h("td", {class: "x"}, "text", child...): an HTML element.
export function h(tag, props, ...children) {
  return append(setAttributes(document.createElement(tag), props), children);
}

// s("rect", {x: 1}): an SVG element (charts).
export function s(tag, props, ...children) {
  return append(setAttributes(document.createElementNS(SVG, tag), props), children);
}

export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export function short(sha) {
  return typeof sha === "string" && sha ? sha.slice(0, 10) : "-";
}

export function text(value) {
  if (value === null || value === undefined || value === "") return "-";
  return String(value);
}

// "2025-05-01T10:00:00Z" -> "2025-05-01 10:00:00" (the ledger's times are UTC).
export function when(stamp) {
  return typeof stamp === "string" ? stamp.replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, " UTC") : "-";
}

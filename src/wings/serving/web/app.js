// The wings web page: chat with images over the server's own OpenAI API (streamed), a router strip under each
// answer (the per-token router weights the model recorded while generating), and compare mode (two models side by
// side, streamed together). Plain JavaScript, nothing loaded from elsewhere.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  info: null,
  columns: [],        // one per model shown: {model, info, history, turns}
  attached: [],       // images waiting for the next message: {name, url, width, height}
  busy: false,
  key: sessionStorage.getItem("wings-api-key") || "",
};

// A cell's colour: w_v = 0 (all textual learner) is blue, w_v = 1 (all visual learner) orange.
const TEXTUAL = [37, 99, 235];
const VISUAL = [249, 115, 22];

function routerColour(w) {
  const t = Math.min(1, Math.max(0, w));
  const [r, g, b] = TEXTUAL.map((a, i) => Math.round(a + (VISUAL[i] - a) * t));
  return `rgb(${r}, ${g}, ${b})`;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

function showBanner(message) {
  const banner = $("#banner");
  banner.textContent = message;
  banner.hidden = false;
}

function clearBanner() {
  $("#banner").hidden = true;
  $("#banner").textContent = "";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const GONE = "cannot reach the server; is `wings serve` still running?";

// The error message of a failed API call, in OpenAI's error shape or otherwise.
async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

async function loadInfo() {
  let response;
  try {
    response = await fetch("/wings/info", { headers: headers() });
  } catch (err) {
    showBanner(`${GONE} (${err.message})`);
    return;
  }
  if (response.status === 401) {
    $("#auth").hidden = false;
    $("#models").textContent = "API key needed";
    return;
  }
  if (!response.ok) {
    showBanner(await errorMessage(response));
    return;
  }
  $("#auth").hidden = true;
  state.info = await response.json();
  const byName = Object.fromEntries(state.info.models.map((m) => [m.id, m]));
  const shown = state.info.compare ? [state.info.compare.main, state.info.compare.baseline] : [state.info.models[0].id];
  $("#models").textContent = state.info.compare ? `compare: ${shown.join(" vs ")}` : shown[0];
  $("#columns").replaceChildren();
  state.columns = shown.map((name) => buildColumn(byName[name]));
}

function buildColumn(info) {
  const column = el("section", "column");
  column.dataset.model = info.id;
  const title = el("h2", "", info.id);
  const router = info.router.available
    ? `${info.mode} · router weights under each answer`
    : `${info.mode} · no router: ${info.router.reason}`;
  title.append(el("span", "note router-status", router));
  const turns = el("div", "turns");
  column.append(title, turns);
  $("#columns").append(column);
  return { model: info.id, info, history: [], turns };
}

// --- attaching images: each one is checked by the server (same limits as a chat request) before it is kept ---

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    let url;
    try {
      url = await readAsDataURL(file);
    } catch (err) {
      showBanner(`${file.name}: cannot be read (${err})`);
      continue;
    }
    if (!url.startsWith("data:image/")) {  // the browser did not recognise an image type: let the server say why
      url = `data:image/png;base64,${url.split(",", 2)[1] || ""}`;
    }
    let response;
    try {
      response = await fetch("/wings/check-image", {
        method: "POST", headers: headers(), body: JSON.stringify({ url, model: state.columns[0].model }),
      });
    } catch (err) {
      showBanner(`${GONE} (${err.message})`);
      return;
    }
    if (!response.ok) {
      showBanner(`${file.name}: ${await errorMessage(response)}`);
      continue;
    }
    const size = await response.json();
    state.attached.push({ name: file.name, url, width: size.width, height: size.height });
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("#attachments");
  box.replaceChildren();
  state.attached.forEach((image, i) => {
    const item = el("span", "attachment");
    const img = el("img");
    img.src = image.url;
    img.alt = image.title = `${image.name} (${image.width}x${image.height})`;
    const remove = el("button", "", "×");
    remove.type = "button";
    remove.title = "remove";
    remove.onclick = () => { state.attached.splice(i, 1); renderAttachments(); };
    item.append(img, remove);
    box.append(item);
  });
}

// --- one turn in one column -----------------------------------------------------------------------------------

function visible(text) {
  return text === "" ? "·" : text.replace(/\n/g, "⏎");
}

function addCells(strip, cells) {
  for (const cell of cells) {
    const span = el("span", "cell", visible(cell.text));
    span.style.backgroundColor = routerColour(cell.w_v);
    span.dataset.wv = String(cell.w_v);
    span.dataset.layers = JSON.stringify(cell.layers);
    const layers = cell.layers.map((w, i) => `learner layer ${i}: w_v ${w.toFixed(3)}`).join("\n");
    span.title = `token ${JSON.stringify(cell.text)} (id ${cell.id})\nw_v ${cell.w_v.toFixed(3)} ` +
      `(mean of ${cell.layers.length} layers)\n${layers}`;
    strip.append(span);
  }
}

function userTurn(column, text, images) {
  const turn = el("div", "turn user");
  if (images.length) {
    const row = el("div", "images");
    for (const image of images) {
      const img = el("img");
      img.src = image.url;
      img.alt = image.name;
      row.append(img);
    }
    turn.append(row);
  }
  turn.append(el("div", "text", text));
  column.turns.append(turn);
  return turn;
}

function assistantTurn(column) {
  const turn = el("div", "turn assistant");
  turn.dataset.state = "streaming";
  turn.dataset.chunks = "0";
  const text = el("div", "text");
  turn.append(text);
  column.turns.append(turn);
  return { turn, text };
}

function fail(turn, message) {
  turn.dataset.state = "error";
  turn.append(el("div", "error", message));
}

async function ask(column, message, images, text, settings) {
  userTurn(column, text, images);
  const { turn, text: answer } = assistantTurn(column);
  const hasImage = images.length > 0 || column.history.some((m) => Array.isArray(m.content) &&
    m.content.some((part) => part.type === "image_url"));
  const body = {
    model: column.model, messages: [...column.history, message], stream: true, max_tokens: settings.maxTokens,
    temperature: settings.temperature, wings_router: true, wings_prompt_router: settings.promptRouter,
  };
  let response;
  try {
    response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (err) {
    fail(turn, `${GONE} (${err.message}). Your message is back in the box below.`);
    return false;
  }
  if (!response.ok) {
    fail(turn, `${await errorMessage(response)}. Your message is back in the box below.`);
    return false;
  }
  let strip = null;
  let content = "";
  try {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const ext = chunk.wings || {};
        if (ext.router) strip = routerArea(turn, ext.router, hasImage);
        if (ext.prompt_tokens && ext.prompt_tokens.length) {
          const promptStrip = el("div", "strip prompt-strip");
          addCells(promptStrip, ext.prompt_tokens);
          turn.insertBefore(promptStrip, answer);
          turn.insertBefore(el("div", "strip-label", "router on the prompt's text tokens"), promptStrip);
        }
        if (ext.tokens && strip) addCells(strip, ext.tokens);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) {
            content += choice.delta.content;
            answer.textContent = content;
            turn.dataset.chunks = String(Number(turn.dataset.chunks) + 1);
          }
          if (choice.finish_reason) turn.dataset.finish = choice.finish_reason;
        }
      }
    }
  } catch (err) {
    const why = err instanceof TypeError ? `${GONE} (${err.message})` : err.message;
    fail(turn, `the answer broke off: ${why}`);
    return false;
  }
  column.history.push(message, { role: "assistant", content });
  turn.dataset.state = "done";
  return true;
}

// Where the router cells of one answer go; or, for a model without a router, a sentence that says so.
function routerArea(turn, router, hasImage) {
  if (!router.available) {
    turn.append(el("div", "router-note no-router", `no router: ${router.reason}`));
    return null;
  }
  turn.append(el("div", "strip-label", "router: w_v of the step that produced each token (hover for each layer)"));
  const strip = el("div", "strip answer-strip");
  turn.append(strip);
  if (!hasImage) {
    strip.classList.add("unapplied");
    turn.append(el("div", "router-note", "no image in this conversation: the router's weights are computed but not " +
      "applied (the visual learner has nothing to read, the textual learner gets full weight)"));
  }
  return strip;
}

// --- the composer -----------------------------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  if (state.busy || !state.columns.length) return;
  const prompt = $("#prompt");
  const text = prompt.value.trim();
  const images = state.attached.slice();
  if (!text && !images.length) return;
  const settings = {
    maxTokens: Math.max(1, parseInt($("#max-tokens").value, 10) || 64),
    temperature: Math.max(0, parseFloat($("#temperature").value) || 0),
    promptRouter: $("#prompt-router").checked,
  };
  // Images first, each followed by a line break, then the text: the layout the models were trained on.
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  parts.push({ type: "text", text: images.length ? `\n${text}` : text });
  const message = { role: "user", content: parts };
  clearBanner();
  prompt.value = "";
  state.attached = [];
  renderAttachments();
  state.busy = true;
  $("#send").disabled = true;
  const results = await Promise.all(state.columns.map((column) => ask(column, message, images, text, settings)));
  if (!results.some(Boolean) && !prompt.value && !state.attached.length) {  // nothing was answered: give it back
    prompt.value = text;
    state.attached = images;
    renderAttachments();
  }
  state.busy = false;
  $("#send").disabled = false;
}

function reset() {
  for (const column of state.columns) {
    column.history = [];
    column.turns.replaceChildren();
  }
  clearBanner();
}

function init() {
  $("#composer").addEventListener("submit", send);
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("#file").addEventListener("change", async (event) => {
    await attach([...event.target.files]);
    event.target.value = "";
  });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) attach(files);
  });
  $("#reset").addEventListener("click", reset);
  $("#auth").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem("wings-api-key", state.key);
    loadInfo();
  });
  loadInfo();
}

init();

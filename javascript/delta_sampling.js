// Delta Sampling: the summary in the accordion's header ("λ 1 · sd15"), and tooltips on the controls that
// gradio builds after the WebUI's own hints.js has run (closed accordions in gradio 4). No globals.
(function() {
    const tabs = ["txt2img", "img2img"];
    let tooltips = null; // [elem_id, text] of our components, read once from the gradio config

    // A text in the WebUI's chosen language: its localization.js holds the map (localizations/*.json).
    function t(text) {
        const tl = typeof getTranslation === "function" ? getTranslation(text) : undefined;
        return tl === undefined ? text : tl;
    }

    function prefix(tab) {
        return "script_" + tab + "_delta_sampling_";
    }

    function byId(id) {
        return gradioApp().getElementById(id);
    }

    function valueOf(id, selector) {
        const root = byId(id);
        const input = root && root.querySelector(selector);
        return input ? input.value : "";
    }

    // "models/sd15.safetensors [6ce0161689]" -> "sd15"
    function shortName(title) {
        const base = title.replace(/\s*\[[0-9a-fA-F]+\]\s*$/, "").split(/[\\/]/).pop();
        return base.replace(/\.(safetensors|ckpt|pt|pth|bin|gguf)$/i, "");
    }

    function summaryText(tab) {
        const p = prefix(tab);
        const source = shortName(valueOf(p + "source", "input")) || t("no source");
        const mode = valueOf(p + "mode", "input:checked") || "delta";
        if (mode === "base-first") {
            return t("base-first") + " · " + source;
        }
        const strength = valueOf(p + "strength", "input[type=number]") || "?";
        const second = byId(p + "group2_enabled");
        const extra = second && second.querySelector("input:checked") ? " + " + t("group 2") : "";
        return "λ " + strength + " · " + source + extra;
    }

    function applyTooltips() {
        if (tooltips === null) {
            const components = (window.gradio_config && window.gradio_config.components) || [];
            tooltips = components
                .filter(c => c.props && c.props.webui_tooltip && (c.props.elem_id || "").includes("_delta_sampling_"))
                .map(c => [c.props.elem_id, c.props.webui_tooltip]);
        }
        for (const [id, text] of tooltips) {
            const elem = byId(id);
            if (!elem) continue;
            // On the accordion, only its header should show the text, not every gap between the controls.
            const target = elem.classList.contains("input-accordion") ? elem.querySelector(".label-wrap") : elem;
            const shown = t(text);
            if (target && target.title !== shown) target.title = shown;
            if (target !== elem && elem.title) elem.removeAttribute("title");
        }
    }

    function update() {
        for (const tab of tabs) {
            const holder = byId(prefix(tab) + "summary");
            const span = holder && holder.querySelector(".delta-sampling-summary-text");
            if (!span) continue;
            const text = summaryText(tab);
            if (span.textContent !== text) span.textContent = text;
        }
        applyTooltips();
    }

    onUiLoaded(function() {
        update();
        // Typing and picking update at once; values set by pasting infotext fire no event, so also look
        // every second (two short strings compared: nothing measurable).
        gradioApp().addEventListener("input", update, true);
        gradioApp().addEventListener("change", update, true);
        setInterval(update, 1000);
    });
})();
